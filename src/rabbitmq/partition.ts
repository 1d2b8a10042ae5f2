/**
 * One partition of a subscription, read by this process while it is given the partition (workers.ts).
 *
 * Channel. A reader has a channel of its own, consuming the partition queue and, once there are holds, its
 * holds queue (both with a single active consumer). Handing the partition over is closing that channel once the handlers in flight
 * are finished and acknowledged: RabbitMQ then returns what was delivered and not acknowledged to the head
 * of the queues and lets the next reader's consumer in. (Cancelling the consumer instead would let the next
 * reader start on later messages while ours were still out.)
 *
 * Order. Messages are lined up per key in arrival order (a lane); a key runs one message at a time, and the
 * subscription's readers in this process run up to `concurrency` keys at once (slots.ts).
 *
 * Delayed retries. A message to retry after a delay goes to a delay queue and its place at the head of its
 * key's lane stays taken ("away"): later messages of that key wait in the lane, in order, until it comes
 * back through the return exchange and is handled. Other keys flow. The hold is written to the holds queue
 * before the message is acknowledged (holds.ts), so whoever reads the partition next keeps holding the key
 * (after a crash, a hand-over, a lost connection). Held messages take prefetch slots; so that a long hold
 * cannot fill the prefetch window (and keep the retried message itself from being delivered), once the
 * partition holds `prefetch / 2` messages behind away keys, the earliest of them go to the delay queue too
 * and keep their places in the lane ("away" as well, with a hold record each): however they come back, they
 * run in lane order. A place whose message does not come back within its delay plus `retryReturnGraceMs` is
 * given up, with a warning.
 *
 * Attempts (core/attempts.ts runs them). `attempt` = attempts recorded in the x-tidings-attempts header (retries through delay queues)
 * + returns counted by the queue (x-delivery-count on quorum queues; classic queues only say "redelivered"),
 * less those a reader made as it let go of the partition without having started the message (holds.ts)
 * + 1. Immediate retries (delay 0) run again in place, without a round trip. Each failed attempt's error
 * travels in x-tidings-history, so a dead letter carries the whole history.
 *
 * Topics. A message of a topic the subscription has and this worker has no handler for is never
 * acknowledged, dead-lettered or run past: the reader hands the partition over, to a worker that has the
 * handler. One of a topic that is no longer the subscription's is skipped or dead-lettered once that is
 * sure (RabbitConsumer#unhandled).
 */
import type { ConfirmChannel, ConsumeMessage, MessagePropertyHeaders } from 'amqplib';
import { runAttempts, type AttemptScope } from '../core/attempts.ts';
import type { AttemptRecord, DeliveryHandler, SubscriptionSpec } from '../core/backbone.ts';
import { newId, type Envelope } from '../core/envelope.ts';
import { describeError, TidingsError } from '../core/errors.ts';
import { sleep } from '../core/sleep.ts';
import { ChannelAcks } from './acks.ts';
import {
  attemptsOf,
  attributeHeaders,
  cleanHeaders,
  copyOptions,
  decode,
  fitHeaders,
  H_ATTEMPTS,
  H_DEAD_AT,
  H_DEAD_ID,
  H_DEAD_REASON,
  H_HISTORY,
  H_PARTITION,
  H_QUEUE,
  H_SUBSCRIPTION,
  historyHeader,
  returnsOf,
  type Decoded,
} from './headers.ts';
import { holdMessage, markerMessage, readHoldsMessage, returnedMessage, type HoldRecord, type Unstarted } from './holds.ts';
import type { Link } from './link.ts';
import type { RecentIds, Slots } from './slots.ts';
import { declareExchanges, declareHolds, declarePartition, declareRetryQueue, retryLevel, type Names, type TopologySettings } from './topology.ts';
import type { Workers } from './workers.ts';

/** A broker has no transaction of its own: the outbox, if any, gives the handler one (src/outbox). */
const NO_TRANSACTION: AttemptScope<undefined> = { tx: undefined, end: async () => undefined };

/** A parked message waits at least this long: a head that is overdue must not make its followers spin. */
const PARK_MIN_MS = 250;
/** Messages a "returned" record names at most (holds.ts): a partition's prefetch window, many times over. */
const MAX_UNSTARTED = 10_000;

export interface ReaderSettings extends TopologySettings {
  /** Unacknowledged messages per partition queue (per-consumer basic.qos). */
  readonly prefetch: number;
  readonly retryMinMs: number;
  readonly retryReturnGraceMs: number;
  readonly reconnectMinMs: number;
  readonly reconnectMaxMs: number;
  readonly connectTimeoutMs: number;
  /** A reader whose marker has not come back within this time starts over (workers.ts' timeout). */
  readonly workerTimeoutMs: number;
  readonly warn: (message: string, error?: unknown) => void;
}

/** What to do with a message of a topic this worker has no handler for (RabbitConsumer#unhandled). */
export type Unhandled =
  | { readonly action: 'hand-over'; readonly pauseMs: number }
  | { readonly action: 'skip' }
  | { readonly action: 'dead-letter'; readonly reason: string };

/** What the readers of one subscription share (RabbitConsumer). */
export interface ReaderHost {
  readonly spec: SubscriptionSpec;
  readonly handle: DeliveryHandler<undefined>;
  readonly link: Link;
  readonly names: Names;
  readonly settings: ReaderSettings;
  readonly slots: Slots;
  readonly recent: RecentIds;
  readonly workers: Workers;
  unhandled(partition: number, topic: string, id: string, fromItsExchange: boolean): Unhandled;
}

interface Entry {
  readonly key: string;
  readonly id: string;
  /** Its place in the lane (held records carry it). */
  readonly seq: number;
  /** local: delivered, waiting; running; moving: being parked in a delay queue; away: in a delay queue, place kept. */
  state: 'local' | 'running' | 'moving' | 'away';
  message: ConsumeMessage | undefined;
  decoded: Decoded | undefined;
  /** The channel generation the message was delivered on: acknowledgements only count on that channel. */
  generation: number;
  /** For an away entry: when its copy is due back from the delay queue, and when to stop waiting for it. */
  dueAt: number;
  giveUpAt: number;
  /** The delivery of its hold record, acknowledged when the entry is finished. */
  record: Delivered | undefined;
  /** Returns of its message that a reader before this one made without starting it: not attempts. */
  unstarted: number;
}

interface Delivered {
  readonly message: ConsumeMessage;
  readonly generation: number;
}

/**
 * idle: no channel. opening. waiting: consuming, nothing delivered yet (the queue is empty or another reader
 * is active). restoring: the first message came; picking up the partition's holds (holds.ts). reading.
 * releasing: no new handler starts; the channel closes once the running ones are finished.
 */
type Phase = 'idle' | 'opening' | 'waiting' | 'restoring' | 'reading' | 'releasing';

export class PartitionReader {
  readonly index: number;
  readonly #host: ReaderHost;
  readonly #queue: string;
  readonly #holdsQueue: string;
  #phase: Phase = 'idle';
  /** Whether the subscription gives this process the partition. */
  #wanted = false;
  /** A hand-over pauses reading the partition until then. */
  #notBefore = 0;
  #wake: AbortController | undefined;
  #driving: Promise<void> | undefined;
  #channel: ConfirmChannel | undefined;
  #acks: ChannelAcks | undefined;
  #generation = 0;
  readonly #lanes = new Map<string, Entry[]>();
  /** Keys whose lane head can run, in the order they became ready. */
  #ready: string[] = [];
  /** Delivered while restoring: placed once the holds are known. */
  #buffered: ConsumeMessage[] = [];
  #restored: Array<{ record: HoldRecord; delivered: Delivered }> = [];
  #restoredReturns: Array<{ unstarted: Unstarted; delivered: Delivered }> = [];
  /** Messages the previous readers returned unstarted, not delivered here yet (see holds.ts), and their records. */
  #unstarted = new Map<string, number>();
  #returnedRecords: Delivered[] = [];
  #marker: string | undefined;
  #markerTimer: NodeJS.Timeout | undefined;
  /** The holds queue consumed on the current channel (declared first), once it is needed. */
  #holds: Promise<void> | undefined;
  readonly #tasks = new Set<Promise<void>>();
  readonly #retryQueues = new Map<number, Promise<string>>();
  readonly #pump = () => this.#run();

  constructor(host: ReaderHost, index: number) {
    this.#host = host;
    this.index = index;
    this.#queue = host.names.partition(host.spec.name, index);
    this.#holdsQueue = host.names.holds(host.spec.name, index);
  }

  /** Reads the partition from now on (resolves once consuming, or once no longer wanted). */
  acquire(): Promise<void> {
    this.#wanted = true;
    return this.#drive();
  }

  /** Stops reading: resolves once the handlers in flight are finished and the channel is closed. */
  release(): Promise<void> {
    this.#wanted = false;
    this.#wake?.abort();
    return this.#drive();
  }

  // ---- the channel's life ---------------------------------------------------------------------------

  #drive(): Promise<void> {
    this.#driving ??= this.#steer().finally(() => {
      this.#driving = undefined;
    });
    return this.#driving;
  }

  /** Opens or closes the channel until the phase matches what is wanted; one at a time. */
  async #steer(): Promise<void> {
    const { reconnectMinMs, reconnectMaxMs } = this.#host.settings;
    for (let waitMs = reconnectMinMs; ; ) {
      const pausedMs = this.#notBefore - Date.now();
      if (!this.#wanted || this.#host.link.closed || pausedMs > 0) {
        if (this.#phase !== 'idle') await this.#close();
        if (!this.#wanted || this.#host.link.closed) return;
        await this.#nap(pausedMs);
        continue;
      }
      if (this.#phase !== 'idle') return;
      try {
        await this.#open();
        waitMs = reconnectMinMs;
      } catch (error) {
        if (this.#host.link.closed) return;
        this.#host.settings.warn(`Subscription ${this.#host.spec.name} could not read partition queue ${this.#queue}; retrying in ${waitMs} ms`, error);
        await this.#nap(waitMs);
        waitMs = Math.min(waitMs * 2, reconnectMaxMs);
      }
    }
  }

  /** Sleeps, unless `release()` or the link's closing ends the wait first. */
  async #nap(ms: number): Promise<void> {
    if (ms <= 0) return;
    const wake = new AbortController();
    this.#wake = wake;
    const onClose = () => wake.abort();
    this.#host.link.signal.addEventListener('abort', onClose, { once: true });
    try {
      await sleep(ms, wake.signal).catch(() => undefined);
    } finally {
      this.#host.link.signal.removeEventListener('abort', onClose);
      this.#wake = undefined;
    }
  }

  async #open(): Promise<void> {
    const { link, names, settings, spec } = this.#host;
    this.#phase = 'opening';
    let channel: ConfirmChannel;
    try {
      channel = await link.confirmChannel(Date.now() + settings.connectTimeoutMs);
    } catch (error) {
      this.#phase = 'idle';
      throw error;
    }
    try {
      await declareExchanges(channel, names, spec);
      await declarePartition(channel, names, settings, spec, this.index);
      const generation = ++this.#generation;
      const acks = new ChannelAcks(channel);
      this.#channel = channel;
      this.#acks = acks;
      this.#retryQueues.clear();
      channel.once('close', () => this.#lost(generation));
      this.#phase = 'waiting';
      await channel.prefetch(settings.prefetch, false);
      await channel.consume(this.#queue, (message) => this.#delivered(channel, acks, message, () => this.#arrive(message!, generation)), { noAck: false });
    } catch (error) {
      if (this.#channel === channel) {
        this.#generation++;
        this.#forgetChannel();
      }
      this.#phase = 'idle';
      await channel.close().catch(() => undefined);
      throw error;
    }
  }

  #delivered(channel: ConfirmChannel, acks: ChannelAcks, message: ConsumeMessage | null, then: () => void): void {
    if (message === null) {
      // The queue was deleted or the server cancelled us: start over on a new channel.
      channel.close().catch(() => undefined);
      return;
    }
    acks.delivered(message);
    then();
  }

  /** The channel closed: what it delivered and we did not acknowledge goes back to the queues by itself. */
  #lost(generation: number): void {
    if (generation !== this.#generation) return;
    this.#forgetChannel();
    for (const [key, lane] of this.#lanes) {
      // Keep what runs (its redelivered copy must wait behind it) and the away places (the holds queue gives
      // their records again); what was only delivered comes again.
      const kept = lane.filter((entry) => entry.state === 'running' || entry.state === 'away');
      if (kept.length === 0) this.#lanes.delete(key);
      else this.#lanes.set(key, kept);
    }
    if (this.#phase !== 'releasing') this.#phase = 'idle';
    if (!this.#host.link.closed) void this.#drive();
  }

  #forgetChannel(): void {
    this.#channel = undefined;
    this.#holds = undefined;
    this.#acks?.discard();
    this.#acks = undefined;
    this.#retryQueues.clear();
    this.#ready = [];
    this.#buffered = [];
    this.#restored = [];
    this.#restoredReturns = [];
    this.#unstarted = new Map();
    this.#returnedRecords = [];
    this.#marker = undefined;
    clearTimeout(this.#markerTimer);
  }

  /**
   * Graceful: no new handler starts; handlers in flight finish and their outcomes are acknowledged; then the
   * channel closes, which returns every message not started (and every hold record) to its queue, ahead of
   * the rest, for whichever reader comes next.
   */
  async #close(): Promise<void> {
    const wasReading = this.#phase === 'reading';
    this.#phase = 'releasing';
    while (this.#tasks.size > 0) await Promise.allSettled([...this.#tasks]);
    const channel = this.#channel;
    if (wasReading && channel !== undefined) await this.#sayReturned(channel);
    this.#generation++;
    try {
      this.#acks?.flush();
    } catch {
      // Closed already: what was not acknowledged comes again.
    }
    this.#forgetChannel();
    await channel?.close().catch(() => undefined);
    this.#lanes.clear();
    this.#phase = 'idle';
  }

  /**
   * Before the channel closes: records which messages go back to the partition queue without having been
   * started (those delivered here, and those the previous readers returned that did not come here yet), so
   * that the next reader does not count those returns as attempts; the records it replaces go.
   */
  async #sayReturned(channel: ConfirmChannel): Promise<void> {
    const unstarted: Record<string, number> = Object.fromEntries(this.#unstarted);
    for (const lane of this.#lanes.values()) {
      for (const entry of lane) if (entry.state === 'local' && entry.generation === this.#generation) unstarted[entry.id] = entry.unstarted + 1;
    }
    const ids = Object.keys(unstarted);
    try {
      if (ids.length > 0) {
        const returned = returnedMessage(Object.fromEntries(ids.slice(0, MAX_UNSTARTED).map((id) => [id, unstarted[id]!])));
        if (this.#holds === undefined) await declareHolds(channel, this.#host.names, this.#host.settings, this.#host.spec.name, this.index);
        await confirm(channel, '', this.#holdsQueue, returned.body, returned.options);
      }
      for (const record of this.#returnedRecords) this.#ackRecord(record);
    } catch {
      // Not recorded: the next reader counts these returns as attempts, as after a crash.
    }
  }

  // ---- the holds queue and the marker ---------------------------------------------------------------

  #arrive(message: ConsumeMessage, generation: number): void {
    if (generation !== this.#generation) return;
    if (this.#phase === 'waiting') {
      // The first message: this reader is the partition's active consumer now. Holds first.
      this.#phase = 'restoring';
      this.#buffered.push(message);
      void this.#takeOver(generation);
      return;
    }
    if (this.#phase === 'restoring') {
      this.#buffered.push(message);
      return;
    }
    this.#place(message, generation);
  }

  /**
   * Picks up the partition's holds before reading it: none if it has no holds queue (no key of it was ever
   * held); else every record, which come before a marker of this reader's own (holds.ts).
   */
  async #takeOver(generation: number): Promise<void> {
    const channel = this.#channel!;
    try {
      if (!(await this.#holdsExist())) {
        if (generation === this.#generation && this.#phase === 'restoring') this.#restore();
        return;
      }
      if (generation !== this.#generation) return;
      await this.#readHolds(channel, generation);
      if (generation !== this.#generation || this.#phase !== 'restoring') return;
      this.#sendMarker(channel, generation);
    } catch (error) {
      if (generation !== this.#generation) return;
      this.#host.settings.warn(`Subscription ${this.#host.spec.name} could not read the holds of ${this.#queue}; starting over`, error);
      channel.close().catch(() => undefined);
    }
  }

  /** Whether the partition has a holds queue; looked up on a channel of its own, which a missing queue closes. */
  async #holdsExist(): Promise<boolean> {
    const probe = await this.#host.link.confirmChannel(Date.now() + this.#host.settings.connectTimeoutMs);
    try {
      await probe.checkQueue(this.#holdsQueue);
      return true;
    } catch (error) {
      if ((error as { code?: unknown }).code === 404) return false;
      throw error;
    } finally {
      await probe.close().catch(() => undefined);
    }
  }

  /** Consumes the holds queue on this channel (declaring it first), once per channel. */
  #readHolds(channel: ConfirmChannel, generation: number): Promise<void> {
    this.#holds ??= (async () => {
      const { names, settings, spec } = this.#host;
      const acks = this.#acks!;
      await declareHolds(channel, names, settings, spec.name, this.index);
      // Hold records stay unacknowledged while their keys are held: no prefetch limit on them.
      await channel.prefetch(0, false);
      await channel.consume(this.#holdsQueue, (message) => this.#delivered(channel, acks, message, () => this.#onHolds(message!, generation)), {
        noAck: false,
      });
    })();
    return this.#holds;
  }

  #sendMarker(channel: ConfirmChannel, generation: number): void {
    const token = newId();
    this.#marker = token;
    const marker = markerMessage({ worker: this.#host.workers.self.id, token });
    confirm(channel, '', this.#holdsQueue, marker.body, marker.options).catch(() => channel.close().catch(() => undefined));
    this.#markerTimer = setTimeout(() => {
      if (generation !== this.#generation || this.#phase !== 'restoring') return;
      this.#host.settings.warn(
        `Subscription ${this.#host.spec.name}: the holds of partition queue ${this.#queue} did not arrive within ${this.#host.settings.workerTimeoutMs} ms (another worker holds ${this.#holdsQueue}?); starting over`,
      );
      channel.close().catch(() => undefined);
    }, this.#host.settings.workerTimeoutMs);
    this.#markerTimer.unref();
  }

  #onHolds(message: ConsumeMessage, generation: number): void {
    if (generation !== this.#generation) return;
    const delivered: Delivered = { message, generation };
    const read = readHoldsMessage(message);
    if (read.kind === 'unknown') {
      this.#host.settings.warn(
        `Subscription ${this.#host.spec.name}: dropped a message in ${this.#holdsQueue} that is neither a hold nor a marker (put there by hand?)`,
      );
      this.#acks?.ack(message);
      return;
    }
    if (read.kind === 'marker') {
      const { marker } = read;
      if (marker.token === this.#marker) {
        this.#acks?.ack(message);
        // Not if the partition is being let go of meanwhile: nothing more starts.
        if (this.#phase === 'restoring') this.#restore();
        return;
      }
      // A marker of a reader that has gone (before it got its own back): ahead of ours.
      this.#acks?.ack(message);
      return;
    }
    if (read.kind === 'returned') {
      if (this.#phase === 'restoring') this.#restoredReturns.push({ unstarted: read.unstarted, delivered });
      // Releasing: our own, published as the channel closes; it goes back to the queue with it, for the next reader.
      else if (this.#phase !== 'releasing') this.#acks?.ack(message);
      return;
    }
    if (this.#phase === 'restoring') {
      this.#restored.push({ record: read.record, delivered });
      return;
    }
    // One of our own records, back from the holds queue.
    const entry = this.#lanes.get(read.record.key)?.find((e) => e.id === read.record.id);
    if (entry === undefined) {
      this.#ackRecord(delivered);
      return;
    }
    if (entry.record !== undefined) this.#ackRecord(entry.record);
    entry.record = delivered;
  }

  /**
   * The marker is back: every hold record of the partition came before it. Held keys get their away places
   * again, in lane order, ahead of anything delivered since; then reading starts.
   */
  #restore(): void {
    clearTimeout(this.#markerTimer);
    const grace = this.#host.settings.retryReturnGraceMs;
    const byKey = new Map<string, Array<{ record: HoldRecord; delivered: Delivered }>>();
    for (const held of this.#restored) byKey.set(held.record.key, [...(byKey.get(held.record.key) ?? []), held]);
    const kept = new Set<Entry>();
    for (const [key, records] of byKey) {
      records.sort((a, b) => a.record.seq - b.record.seq);
      const lane = this.#lanes.get(key) ?? [];
      const running = lane.filter((entry) => entry.state === 'running');
      const away: Entry[] = [];
      for (const { record, delivered } of records) {
        let entry = lane.find((e) => e.id === record.id) ?? away.find((e) => e.id === record.id);
        if (entry === undefined) {
          entry = {
            key,
            id: record.id,
            seq: record.seq,
            state: 'away',
            message: undefined,
            decoded: undefined,
            generation: this.#generation,
            dueAt: record.dueAt,
            giveUpAt: record.dueAt + grace,
            record: undefined,
            unstarted: 0,
          };
        } else if (entry.state === 'away') {
          entry.dueAt = Math.max(entry.dueAt, record.dueAt);
          entry.giveUpAt = entry.dueAt + grace;
        }
        if (entry.record !== undefined) this.#ackRecord(entry.record);
        entry.record = delivered;
        if (entry.state === 'away' && !away.includes(entry)) away.push(entry);
        kept.add(entry);
      }
      this.#lanes.set(key, [...running, ...away]);
    }
    // Away places kept from a lost channel without a record now were finished by another reader meanwhile.
    for (const [key, lane] of this.#lanes) {
      const left = lane.filter((entry) => entry.state !== 'away' || kept.has(entry));
      if (left.length === 0) this.#lanes.delete(key);
      else this.#lanes.set(key, left);
    }
    for (const { unstarted, delivered } of this.#restoredReturns) {
      for (const [id, count] of Object.entries(unstarted)) this.#unstarted.set(id, (this.#unstarted.get(id) ?? 0) + count);
      this.#returnedRecords.push(delivered);
    }
    this.#restored = [];
    this.#restoredReturns = [];
    this.#marker = undefined;
    this.#phase = 'reading';
    const buffered = this.#buffered;
    this.#buffered = [];
    for (const message of buffered) this.#place(message, this.#generation);
    this.#run();
  }

  #ackRecord(record: Delivered): void {
    if (record.generation === this.#generation) this.#acks?.ack(record.message);
  }

  // ---- lanes ----------------------------------------------------------------------------------------

  #place(message: ConsumeMessage, generation: number): void {
    const decoded = decode(message, this.#exchangeTopic(message));
    const unstarted = this.#takeUnstarted(decoded.ok ? decoded.value.envelope.id : decoded.id);
    if (!decoded.ok) {
      const reason = `UNDECODABLE_MESSAGE: message ${decoded.id ?? `(no id, delivery ${message.fields.deliveryTag})`} in queue ${this.#queue} cannot be decoded: ${decoded.problem}`;
      const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, decoded.id === undefined ? {} : { ref: { id: decoded.id } }));
      this.#track(this.#deadLetterRaw(message, generation, reason, [{ attempt: 1, at: new Date().toISOString(), error }]));
      return;
    }
    const { envelope } = decoded.value;
    const key = envelope.partitionkey;
    let lane = this.#lanes.get(key);
    const away = lane?.find((entry) => entry.state === 'away' && entry.id === envelope.id && entry.message === undefined);
    if (away !== undefined) {
      // A retried (or parked) message is back: it takes its place again.
      away.state = 'local';
      away.message = message;
      away.decoded = decoded.value;
      away.generation = generation;
      away.unstarted = unstarted;
      if (lane![0] === away) this.#ready.push(key);
      else if (lane![0]!.state === 'away') this.#relieve();
      this.#run();
      return;
    }
    if (lane === undefined) {
      lane = [];
      this.#lanes.set(key, lane);
    }
    const seq = lane.length === 0 ? 0 : lane[lane.length - 1]!.seq + 1;
    lane.push({ key, id: envelope.id, seq, state: 'local', message, decoded: decoded.value, generation, giveUpAt: 0, dueAt: 0, record: undefined, unstarted });
    if (lane.length === 1) {
      this.#ready.push(key);
      this.#run();
      return;
    }
    if (lane[0]!.state === 'away') this.#relieve();
  }

  /** The topic whose exchange the message came through, if it came through one (not the return exchange). */
  #exchangeTopic(message: ConsumeMessage): string | undefined {
    const exchange = message.fields.exchange;
    const prefix = this.#host.names.prefix;
    return exchange.startsWith(prefix) && !exchange.includes(':') ? exchange.slice(prefix.length) : undefined;
  }

  /** How many returns of message `id` were not attempts; once every such message is here, their records go. */
  #takeUnstarted(id: string | undefined): number {
    if (id === undefined || this.#unstarted.size === 0) return 0;
    const count = this.#unstarted.get(id) ?? 0;
    this.#unstarted.delete(id);
    if (this.#unstarted.size === 0) {
      for (const record of this.#returnedRecords) this.#ackRecord(record);
      this.#returnedRecords = [];
    }
    return count;
  }

  /** The attempt a delivery is: attempts before it went through a delay queue, returns that were attempts, this one. */
  #attemptOf(entry: Entry): number {
    return entry.decoded!.priorAttempts + Math.max(returnsOf(entry.message!) - entry.unstarted, 0) + 1;
  }

  /**
   * Keeps the messages held behind away keys to half the prefetch window, parking some in a delay queue:
   * otherwise held messages could fill the window and keep the very message they wait for from being
   * delivered. Called when a message joins a held key and when a key becomes held. A lane's earliest local
   * messages are parked first, so that its messages that never left the partition queue always come after
   * its held records: a reader taking the partition over puts those records first and the returned messages
   * after them, in order. (Test: faults.rabbitmq 'kill -9 while a key waits ..., parked in the delay queue'.)
   */
  #relieve(): void {
    if (this.#phase !== 'reading') return;
    const heldLanes = [...this.#lanes.values()].filter((lane) => lane[0]!.state === 'away');
    let excess = -Math.floor(this.#host.settings.prefetch / 2);
    for (const lane of heldLanes) for (const entry of lane) if (entry.state === 'local') excess++;
    for (const lane of heldLanes) {
      const head = lane[0]!;
      for (const entry of lane) {
        if (excess <= 0) return;
        if (entry.state !== 'local') continue;
        excess--;
        this.#track(this.#park(entry, Math.max(head.dueAt - Date.now(), PARK_MIN_MS)));
      }
    }
  }

  /** Starts the lane heads that can run, as long as the subscription has free slots. */
  #run(): void {
    const { slots, spec } = this.#host;
    while (this.#phase === 'reading' && this.#ready.length > 0) {
      const key = this.#ready[0]!;
      const head = this.#lanes.get(key)?.[0];
      if (head === undefined || head.state !== 'local') {
        this.#ready.shift();
        continue;
      }
      const topic = head.decoded!.envelope.topic;
      const unhandled = spec.topics.includes(topic)
        ? undefined
        : this.#host.unhandled(this.index, topic, head.id, this.#exchangeTopic(head.message!) === topic);
      if (unhandled?.action === 'hand-over') {
        // Not acknowledged, not run past: the partition goes back to its queue, for a worker that handles it.
        this.#notBefore = Date.now() + unhandled.pauseMs;
        void this.#drive();
        return;
      }
      if (!slots.take()) {
        slots.wait(this.#pump);
        return;
      }
      this.#ready.shift();
      head.state = 'running';
      this.#track(
        (unhandled === undefined ? this.#handle(head) : unhandled.action === 'skip' ? this.#skip(head) : this.#refuse(head, unhandled.reason)).finally(() => {
          slots.give();
          this.#run();
        }),
      );
    }
  }

  async #handle(entry: Entry): Promise<void> {
    const decoded = entry.decoded!;
    const { recent, spec } = this.#host;
    if (spec.inbox && recent.has(entry.id)) {
      try {
        this.#ack(entry);
      } catch {
        // The channel is gone: the duplicate comes again and is dropped again.
      }
      this.#done(entry);
      return;
    }
    let settled = false;
    try {
      const result = await runAttempts(this.#host.handle, {
        first: this.#attemptOf(entry),
        history: [...decoded.history],
        retry: spec.retry,
        envelope: () => decoded.envelope,
        open: () => NO_TRANSACTION,
        // Letting go of the partition: a failed attempt waits in a delay queue for the next reader.
        stopping: () => this.#phase !== 'reading',
      });
      if (result.kind === 'ack') {
        this.#ack(entry);
        if (spec.inbox) recent.add(entry.id);
      } else if (result.kind === 'dead') {
        await this.#deadLetter(entry, result.reason, result.history, result.history.at(-1)?.attempt ?? this.#attemptOf(entry));
      } else {
        await this.#sendToDelay(entry, result.delayMs, { [H_ATTEMPTS]: result.attempt, [H_HISTORY]: historyHeader(result.history) });
        settled = true;
        this.#relieve();
        return;
      }
      settled = true;
      this.#done(entry);
    } catch (error) {
      // The channel went away while the outcome was being recorded: the broker redelivers the message.
      if (this.#phase !== 'releasing')
        this.#host.settings.warn(`Subscription ${spec.name} could not record the outcome of message ${entry.id}; it will be delivered again`, error);
    } finally {
      if (!settled) this.#done(entry);
    }
  }

  /** A message of a topic that is no longer the subscription's, come through a binding left behind: acknowledged. */
  async #skip(entry: Entry): Promise<void> {
    try {
      this.#ack(entry);
    } catch {
      // The channel is gone: it comes again and is skipped again.
    }
    this.#done(entry);
  }

  /** A message of a topic no worker has a handler for, not come from its exchange: a dead letter, with the reason. */
  async #refuse(entry: Entry, reason: string): Promise<void> {
    const decoded = entry.decoded!;
    const attempt = this.#attemptOf(entry);
    const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, { ref: { id: entry.id, topic: decoded.envelope.topic, key: entry.key } }));
    try {
      await this.#deadLetter(entry, reason, [...decoded.history, { attempt, at: new Date().toISOString(), error }], attempt);
      this.#host.settings.warn(`Subscription ${this.#host.spec.name}: ${reason}; moved to ${this.#host.names.deadQueue(this.#host.spec.name)}`);
    } catch (failure) {
      if (this.#phase !== 'releasing')
        this.#host.settings.warn(`Subscription ${this.#host.spec.name} could not dead-letter message ${entry.id}; it will be delivered again`, failure);
    } finally {
      this.#done(entry);
    }
  }

  /** The head of a lane is finished: its hold record goes, and the next message of the key, if any, may run. */
  #done(entry: Entry): void {
    if (entry.record !== undefined) this.#ackRecord(entry.record);
    entry.record = undefined;
    const lane = this.#lanes.get(entry.key);
    if (lane === undefined) return;
    const index = lane.indexOf(entry);
    if (index >= 0) lane.splice(index, 1);
    if (lane.length === 0) this.#lanes.delete(entry.key);
    else if (index === 0 && lane[0]!.state === 'local') this.#ready.push(entry.key);
    else if (index === 0 && lane[0]!.state === 'away') this.#relieve();
  }

  #ack(entry: Entry, message = entry.message!, generation = entry.generation): void {
    if (generation !== this.#generation || this.#acks === undefined) {
      throw new TidingsError('BACKBONE_UNAVAILABLE', `The channel that delivered message ${entry.id} closed before its acknowledgement`, { retryable: true });
    }
    this.#acks.ack(message);
  }

  /** A message held behind an away key leaves the prefetch window: it waits in the delay queue, keeping its place. */
  async #park(entry: Entry, delayMs: number): Promise<void> {
    entry.state = 'moving';
    try {
      await this.#sendToDelay(entry, delayMs, {});
    } catch (error) {
      const lane = this.#lanes.get(entry.key);
      if (lane === undefined || !lane.includes(entry)) return;
      if (this.#phase !== 'releasing')
        this.#host.settings.warn(`Subscription ${this.#host.spec.name} could not park message ${entry.id} of a held key; it stays in memory`, error);
      entry.state = 'local';
      if (lane[0] === entry) {
        this.#ready.push(entry.key);
        this.#run();
      }
    }
  }

  /**
   * Sends the message to the delay queue for `delayMs` and records the hold, then acknowledges the message;
   * its place in the lane stays.
   */
  async #sendToDelay(entry: Entry, delayMs: number, extra: MessagePropertyHeaders): Promise<void> {
    const channel = this.#channelOf(entry);
    const level = retryLevel(delayMs, this.#host.settings.retryMinMs);
    const queue = await this.#retryQueue(channel, level);
    const { message, decoded, generation, state } = entry;
    // What the first delivery derived (a topic from the exchange, a time from now...) travels with the copy.
    const original = cleanHeaders(message!.properties.headers);
    const headers = fitHeaders({ ...original, ...attributeHeaders(decoded!.envelope, original), ...extra, [H_PARTITION]: String(this.index) });
    // Away before the publish: the copy may come back (a short delay) before the confirm does.
    entry.state = 'away';
    entry.message = undefined;
    entry.decoded = undefined;
    entry.dueAt = Date.now() + level;
    entry.giveUpAt = entry.dueAt + this.#host.settings.retryReturnGraceMs;
    const hold = holdMessage({ key: entry.key, id: entry.id, dueAt: entry.dueAt, seq: entry.seq });
    try {
      await this.#readHolds(channel, generation);
      await Promise.all([
        confirm(channel, '', this.#holdsQueue, hold.body, hold.options),
        confirm(channel, '', queue, message!.content, copyOptions(message!, headers)),
      ]);
    } catch (error) {
      Object.assign(entry, { state, message, decoded });
      throw error;
    }
    this.#ack(entry, message, generation);
  }

  #retryQueue(channel: ConfirmChannel, level: number): Promise<string> {
    let queue = this.#retryQueues.get(level);
    if (queue === undefined) {
      queue = declareRetryQueue(channel, this.#host.names, this.#host.settings, this.#host.spec.name, level);
      this.#retryQueues.set(level, queue);
      queue.catch(() => this.#retryQueues.delete(level));
    }
    return queue;
  }

  async #deadLetter(entry: Entry, reason: string, history: readonly AttemptRecord[], attempt: number): Promise<void> {
    const channel = this.#channelOf(entry);
    const message = entry.message!;
    const headers = this.#deadHeaders(message, reason, history, attempt, entry.decoded!.envelope);
    await confirm(channel, '', this.#host.names.deadQueue(this.#host.spec.name), message.content, copyOptions(message, headers));
    this.#ack(entry);
  }

  /** A message that cannot be decoded goes to dead letters as it came (body and headers), with the reason. */
  async #deadLetterRaw(message: ConsumeMessage, generation: number, reason: string, history: readonly AttemptRecord[]): Promise<void> {
    const { names, settings, spec } = this.#host;
    try {
      const channel = this.#channel;
      if (channel === undefined || generation !== this.#generation) return;
      const headers = this.#deadHeaders(message, reason, history, attemptsOf(message.properties.headers ?? {}) + 1);
      await confirm(channel, '', names.deadQueue(spec.name), message.content, copyOptions(message, headers));
      if (generation === this.#generation) this.#acks?.ack(message);
      settings.warn(`Subscription ${spec.name}: ${reason}; moved to ${names.deadQueue(spec.name)}`);
    } catch (error) {
      if (this.#phase !== 'releasing')
        settings.warn(`Subscription ${spec.name} could not dead-letter an undecodable message; it will be delivered again`, error);
    }
  }

  /** The dead letter's headers: the message's, what its delivery derived, the dead-letter facts; cut to fit. */
  #deadHeaders(message: ConsumeMessage, reason: string, history: readonly AttemptRecord[], attempt: number, envelope?: Envelope): MessagePropertyHeaders {
    const original = cleanHeaders(message.properties.headers);
    return fitHeaders({
      ...original,
      ...(envelope === undefined ? {} : attributeHeaders(envelope, original)),
      [H_DEAD_ID]: newId(),
      [H_DEAD_REASON]: reason.slice(0, 4_000),
      [H_DEAD_AT]: new Date().toISOString(),
      [H_SUBSCRIPTION]: this.#host.spec.name,
      [H_QUEUE]: this.#queue,
      [H_PARTITION]: String(this.index),
      [H_ATTEMPTS]: attempt,
      [H_HISTORY]: historyHeader(history),
    });
  }

  #channelOf(entry: Entry): ConfirmChannel {
    const channel = this.#channel;
    if (channel === undefined || entry.generation !== this.#generation) {
      throw new TidingsError('BACKBONE_UNAVAILABLE', `The channel that delivered message ${entry.id} closed`, { retryable: true });
    }
    return channel;
  }

  /** Gives up on away places whose message has not come back in time, so their keys move on. */
  sweep(): void {
    if (this.#phase !== 'reading') return;
    const now = Date.now();
    for (const [key, lane] of this.#lanes) {
      for (const entry of [...lane]) {
        if (entry.state !== 'away' || entry.message !== undefined || entry.giveUpAt > now) continue;
        this.#host.settings.warn(
          `Subscription ${this.#host.spec.name}: message ${entry.id} (key ${key}) did not come back from its delay queue within ${this.#host.settings.retryReturnGraceMs} ms of its due time; later messages of the key go on`,
        );
        this.#done(entry);
      }
    }
    this.#run();
  }

  #track(task: Promise<void>): void {
    this.#tasks.add(task);
    task.finally(() => this.#tasks.delete(task)).catch(() => undefined);
  }
}

function confirm(
  channel: ConfirmChannel,
  exchange: string,
  routingKey: string,
  content: Buffer,
  options: Parameters<ConfirmChannel['publish']>[3],
): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      channel.publish(exchange, routingKey, content, options, (error: unknown) => (error ? reject(error) : resolve()));
    } catch (error) {
      reject(error);
    }
  });
}
