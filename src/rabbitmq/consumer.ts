/**
 * One subscription's consumer in one process.
 *
 * Order. Each partition queue has a single active consumer (x-single-active-consumer): one process at a
 * time reads it, and another takes over when that one goes away. In the process, messages are lined up per
 * key in arrival order (a lane); a key runs one message at a time, and up to `concurrency` keys run at once.
 *
 * Delayed retries. A message to retry after a delay goes to a delay queue (confirmed, then acknowledged) and
 * its place at the head of its key's lane stays taken ("away"): later messages of that key stay unacknowledged
 * in the lane, in order, until it comes back through the return exchange and is handled. Other keys flow.
 * Held messages take prefetch slots; so that a long hold cannot fill the prefetch window (and keep the
 * retried message itself from being delivered), once a partition holds `prefetch / 2` messages behind away
 * keys, the next ones are sent to the delay queue too and keep their own places in the lane ("away" as
 * well): however they come back, they run in lane order. A place whose message does not come back within its
 * delay plus `retryReturnGraceMs` (its copy went to another process after a takeover) is given up, with a warning.
 *
 * Attempts. `attempt` = attempts recorded in the x-tidings-attempts header (retries through delay queues)
 * + returns counted by the queue (x-delivery-count on quorum queues; classic queues only say "redelivered")
 * + 1. Immediate retries (delay 0) run again in place, without a round trip. Each failed attempt's error
 * travels in x-tidings-history, so a dead letter carries the whole history.
 */
import type { ConfirmChannel, ConsumeMessage, MessagePropertyHeaders } from 'amqplib';
import type { AttemptRecord, Consumer, DeliveryHandler, DeliveryResult, SubscriptionSpec } from '../core/backbone.ts';
import { newId } from '../core/envelope.ts';
import { describeError, TidingsError } from '../core/errors.ts';
import type { Envelope } from '../core/envelope.ts';
import {
  attemptsOf,
  attributeHeaders,
  cleanHeaders,
  copyOptions,
  decode,
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
import { sleep } from '../core/sleep.ts';
import { ChannelAcks } from './acks.ts';
import type { Link } from './link.ts';
import { declareRetryQueue, declareSubscription, retryLevel, type Names, type TopologySettings } from './topology.ts';

/** A parked message waits at least this long: a head that is overdue must not make its followers spin. */
const PARK_MIN_MS = 250;

export interface ConsumerSettings extends TopologySettings {
  /** Unacknowledged messages per partition queue (per-consumer basic.qos). */
  readonly prefetch: number;
  readonly retryMinMs: number;
  readonly retryReturnGraceMs: number;
  /** Wait after a handler promise rejected (a bug in the pipeline or a middleware), before trying again. */
  readonly rejectedHandlerRetryMs: number;
  readonly reconnectMinMs: number;
  readonly reconnectMaxMs: number;
  readonly warn: (message: string, error?: unknown) => void;
  readonly register: (subscription: string) => Promise<void>;
  /**
   * How many handled ids each subscription remembers in memory to drop a duplicate (the same id published
   * twice, a publish retried after a lost confirm). Per process and best effort: the outbox's inbox is the
   * durable one. 0 turns it off.
   */
  readonly recentIds: number;
}

interface Entry {
  readonly key: string;
  readonly id: string;
  readonly partition: number;
  /** local: delivered, waiting; running; moving: being parked in a delay queue; away: in a delay queue, place kept. */
  state: 'local' | 'running' | 'moving' | 'away';
  message: ConsumeMessage | undefined;
  decoded: Decoded | undefined;
  /** The channel generation the message was delivered on: acknowledgements only count on that channel. */
  generation: number;
  /** For an away entry: when to stop waiting for it. */
  giveUpAt: number;
  /** For an away entry: when its copy is due back from the delay queue. */
  dueAt: number;
}

export class RabbitConsumer implements Consumer {
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<undefined>;
  readonly #link: Link;
  readonly #names: Names;
  readonly #settings: ConsumerSettings;
  readonly #lanes = new Map<string, Entry[]>();
  /** Keys whose lane head can run, in the order they became ready. */
  readonly #ready: string[] = [];
  readonly #tasks = new Set<Promise<void>>();
  readonly #retryQueues = new Map<number, Promise<string>>();
  /** Ids handled lately (insertion order = age), when the subscription keeps an inbox: see `recentIds`. */
  readonly #recent = new Set<string>();
  #channel: ConfirmChannel | undefined;
  /** Acknowledgements of the current channel, sent together (see acks.ts). */
  #acks: ChannelAcks | undefined;
  #generation = 0;
  #running = 0;
  #stopping = false;
  #stopped = false;
  #sweeper: NodeJS.Timeout | undefined;
  #supervising: Promise<void> | undefined;

  constructor(spec: SubscriptionSpec, handle: DeliveryHandler<undefined>, link: Link, names: Names, settings: ConsumerSettings) {
    this.#spec = spec;
    this.#handle = handle;
    this.#link = link;
    this.#names = names;
    this.#settings = settings;
  }

  /** Declares the topology and starts consuming; resolves once every partition queue has a consumer. */
  async start(deadline: number): Promise<void> {
    await this.#connect(deadline);
    await this.#settings.register(this.#spec.name);
    this.#sweeper = setInterval(() => this.#sweep(), 250);
    this.#sweeper.unref();
  }

  async #connect(deadline?: number): Promise<void> {
    const channel = await this.#link.confirmChannel(deadline);
    try {
      if (this.#stopping) throw new TidingsError('STOPPED', `Subscription ${this.#spec.name} is stopping`);
      await declareSubscription(channel, this.#names, this.#settings, this.#spec);
      this.#retryQueues.clear();
      const generation = ++this.#generation;
      this.#channel = channel;
      const acks = new ChannelAcks(channel);
      this.#acks = acks;
      channel.once('close', () => this.#lost(generation));
      await channel.prefetch(this.#settings.prefetch, false);
      for (let partition = 0; partition < this.#spec.partitions; partition++) {
        await channel.consume(
          this.#names.partition(this.#spec.name, partition),
          (message) => {
            if (message === null) {
              // The queue was deleted or the server cancelled us: start over on a new channel.
              channel.close().catch(() => undefined);
              return;
            }
            acks.delivered(message);
            this.#arrive(partition, message, generation);
          },
          { noAck: false },
        );
      }
    } catch (error) {
      await channel.close().catch(() => undefined);
      throw error;
    }
  }

  /** The channel closed: what it delivered and we did not acknowledge goes back to the queue by itself. */
  #lost(generation: number): void {
    if (generation !== this.#generation) return;
    this.#channel = undefined;
    this.#acks?.discard();
    this.#acks = undefined;
    this.#retryQueues.clear();
    for (const [key, lane] of this.#lanes) {
      // Keep what runs (its redelivered copy must wait behind it) and the away places (order of held keys);
      // what was only delivered comes again.
      const kept = lane.filter((entry) => entry.state === 'running' || entry.state === 'away');
      if (kept.length === 0) this.#lanes.delete(key);
      else this.#lanes.set(key, kept);
    }
    this.#ready.length = 0;
    for (const [key, lane] of this.#lanes) if (lane[0]?.state === 'local') this.#ready.push(key);
    if (this.#stopping || this.#link.closed) return;
    this.#supervising ??= this.#reconnect().finally(() => {
      this.#supervising = undefined;
    });
  }

  async #reconnect(): Promise<void> {
    for (let waitMs = this.#settings.reconnectMinMs; !this.#stopping && !this.#link.closed; waitMs = Math.min(waitMs * 2, this.#settings.reconnectMaxMs)) {
      try {
        await this.#connect();
        return;
      } catch (error) {
        if (this.#stopping || this.#link.closed) return;
        this.#settings.warn(`Subscription ${this.#spec.name} could not resume consuming; retrying in ${waitMs} ms`, error);
        await sleep(waitMs, this.#link.signal);
      }
    }
  }

  #arrive(partition: number, message: ConsumeMessage, generation: number): void {
    const queue = this.#names.partition(this.#spec.name, partition);
    const exchange = message.fields.exchange;
    const fromTopic = exchange.startsWith(this.#names.prefix) && !exchange.includes(':') ? exchange.slice(this.#names.prefix.length) : undefined;
    const decoded = decode(message, fromTopic);
    if (!decoded.ok) {
      const reason = `UNDECODABLE_MESSAGE: message ${decoded.id ?? `(no id, delivery ${message.fields.deliveryTag})`} in queue ${queue} cannot be decoded: ${decoded.problem}`;
      const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, decoded.id === undefined ? {} : { ref: { id: decoded.id } }));
      this.#track(this.#deadLetterRaw(message, generation, partition, reason, [{ attempt: 1, at: new Date().toISOString(), error }]));
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
      if (lane![0] === away) this.#ready.push(key);
      else if (lane![0]!.state === 'away') this.#relieve(partition);
      this.#pump();
      return;
    }
    const entry: Entry = { key, id: envelope.id, partition, state: 'local', message, decoded: decoded.value, generation, giveUpAt: 0, dueAt: 0 };
    if (lane === undefined) {
      lane = [];
      this.#lanes.set(key, lane);
    }
    lane.push(entry);
    if (lane.length === 1) {
      this.#ready.push(key);
      this.#pump();
      return;
    }
    if (lane[0]!.state === 'away') this.#relieve(partition);
  }

  /**
   * Keeps the messages of a partition held behind away keys to half its prefetch window, parking the latest
   * ones in a delay queue: otherwise held messages could fill the window and keep the very message they
   * wait for from being delivered. Called when a message joins a held key and when a key becomes held.
   */
  #relieve(partition: number): void {
    const limit = Math.floor(this.#settings.prefetch / 2);
    const held: { entry: Entry; head: Entry }[] = [];
    for (const lane of this.#lanes.values()) {
      const head = lane[0]!;
      if (head.state !== 'away') continue;
      for (const entry of lane) if (entry.state === 'local' && entry.partition === partition) held.push({ entry, head });
    }
    for (let excess = held.length - limit; excess > 0; excess--) {
      const { entry, head } = held.pop()!;
      this.#track(this.#park(entry, Math.max(head.dueAt - Date.now(), PARK_MIN_MS)));
    }
  }

  #pump(): void {
    while (!this.#stopping && this.#running < this.#spec.concurrency && this.#ready.length > 0) {
      const key = this.#ready.shift()!;
      const head = this.#lanes.get(key)?.[0];
      if (head === undefined || head.state !== 'local') continue;
      head.state = 'running';
      this.#running++;
      this.#track(
        this.#run(head).finally(() => {
          this.#running--;
          this.#pump();
        }),
      );
    }
  }

  async #run(entry: Entry): Promise<void> {
    const decoded = entry.decoded!;
    const message = entry.message!;
    if (this.#spec.inbox && this.#recent.has(entry.id)) {
      try {
        this.#ack(entry);
      } catch {
        // The channel is gone: the duplicate comes again and is dropped again.
      }
      this.#done(entry);
      return;
    }
    const history = [...decoded.history];
    let attempt = decoded.priorAttempts + returnsOf(message) + 1;
    let settled = false;
    try {
      for (;;) {
        const result = await this.#attempt(decoded, attempt);
        if (result.outcome === 'ack') {
          this.#ack(entry);
          this.#remember(entry.id);
          break;
        }
        history.push({ attempt, at: new Date().toISOString(), error: result.error });
        if (result.outcome === 'dead-letter') {
          await this.#deadLetter(entry, result.reason, history, attempt);
          break;
        }
        if (result.delayMs <= 0 && !this.#stopping) {
          attempt++;
          continue;
        }
        await this.#retry(entry, result.delayMs, history, attempt);
        settled = true;
        if (!this.#stopping) this.#relieve(entry.partition);
        return;
      }
      settled = true;
      this.#done(entry);
    } catch (error) {
      // The channel went away while the outcome was being recorded: the broker redelivers the message.
      if (!this.#stopping) this.#settings.warn(`Subscription ${this.#spec.name} could not record the outcome of message ${entry.id}; it will be delivered again`, error);
    } finally {
      if (!settled) this.#done(entry);
    }
  }

  #remember(id: string): void {
    if (!this.#spec.inbox || this.#settings.recentIds === 0) return;
    this.#recent.add(id);
    if (this.#recent.size > this.#settings.recentIds) this.#recent.delete(this.#recent.values().next().value!);
  }

  /** One attempt; a handler promise that rejects (it should not) counts as a failure to retry after a pause. */
  async #attempt(decoded: Decoded, attempt: number): Promise<DeliveryResult> {
    try {
      return await this.#handle({ envelope: decoded.envelope, attempt, tx: undefined });
    } catch (error) {
      this.#settings.warn(`Subscription ${this.#spec.name}: the handler pipeline failed for message ${decoded.envelope.id}; retrying in ${this.#settings.rejectedHandlerRetryMs} ms`, error);
      return { outcome: 'retry', delayMs: this.#settings.rejectedHandlerRetryMs, error: describeError(error) };
    }
  }

  /** The head of a lane is finished: the next message of the key, if any, may run. */
  #done(entry: Entry): void {
    const lane = this.#lanes.get(entry.key);
    if (lane === undefined) return;
    const index = lane.indexOf(entry);
    if (index >= 0) lane.splice(index, 1);
    if (lane.length === 0) this.#lanes.delete(entry.key);
    else if (index === 0 && lane[0]!.state === 'local') this.#ready.push(entry.key);
    else if (index === 0 && lane[0]!.state === 'away' && !this.#stopping) this.#relieve(lane[0]!.partition);
  }

  #ack(entry: Entry, message = entry.message!, generation = entry.generation): void {
    if (generation !== this.#generation || this.#acks === undefined) {
      throw new TidingsError('BACKBONE_UNAVAILABLE', `The channel that delivered message ${entry.id} closed before its acknowledgement`, { retryable: true });
    }
    this.#acks.ack(message);
  }

  /** Sends the message to the delay queue for `delayMs`, then acknowledges it; its place in the lane stays. */
  async #retry(entry: Entry, delayMs: number, history: readonly AttemptRecord[], attempt: number): Promise<void> {
    await this.#sendToDelay(entry, delayMs, { [H_ATTEMPTS]: attempt, [H_HISTORY]: historyHeader(history) });
    if (this.#stopping) {
      // Nobody stays to wait for it: the place is released, and the copy comes back to whoever consumes then.
      this.#done(entry);
    }
  }

  /** A message held behind an away key leaves the prefetch window: it waits in the delay queue, keeping its place. */
  async #park(entry: Entry, delayMs: number): Promise<void> {
    entry.state = 'moving';
    try {
      await this.#sendToDelay(entry, delayMs, {});
    } catch (error) {
      const lane = this.#lanes.get(entry.key);
      if (lane === undefined || !lane.includes(entry)) return;
      if (!this.#stopping) this.#settings.warn(`Subscription ${this.#spec.name} could not park message ${entry.id} of a held key; it stays in memory`, error);
      entry.state = 'local';
      if (lane[0] === entry) {
        this.#ready.push(entry.key);
        this.#pump();
      }
    }
  }

  async #sendToDelay(entry: Entry, delayMs: number, extra: MessagePropertyHeaders): Promise<void> {
    const channel = this.#channelOf(entry);
    const level = retryLevel(delayMs, this.#settings.retryMinMs);
    const queue = await this.#retryQueue(channel, level);
    const { message, decoded, generation, state } = entry;
    // What the first delivery derived (a topic from the exchange, a time from now...) travels with the copy.
    const headers = { ...cleanHeaders(message!.properties.headers), ...attributeHeaders(decoded!.envelope), ...extra, [H_PARTITION]: String(entry.partition) };
    // Away before the publish: the copy may come back (a short delay) before the confirm does.
    entry.state = 'away';
    entry.message = undefined;
    entry.decoded = undefined;
    entry.dueAt = Date.now() + level;
    entry.giveUpAt = entry.dueAt + this.#settings.retryReturnGraceMs;
    try {
      await confirm(channel, '', queue, message!.content, copyOptions(message!, headers));
    } catch (error) {
      Object.assign(entry, { state, message, decoded });
      throw error;
    }
    this.#ack(entry, message, generation);
  }

  #retryQueue(channel: ConfirmChannel, level: number): Promise<string> {
    let queue = this.#retryQueues.get(level);
    if (queue === undefined) {
      queue = declareRetryQueue(channel, this.#names, this.#settings, this.#spec.name, level);
      this.#retryQueues.set(level, queue);
      queue.catch(() => this.#retryQueues.delete(level));
    }
    return queue;
  }

  async #deadLetter(entry: Entry, reason: string, history: readonly AttemptRecord[], attempt: number): Promise<void> {
    const channel = this.#channelOf(entry);
    const message = entry.message!;
    const headers = this.#deadHeaders(message, entry.partition, reason, history, attempt, entry.decoded!.envelope);
    await confirm(channel, '', this.#names.deadQueue(this.#spec.name), message.content, copyOptions(message, headers));
    this.#ack(entry);
  }

  /** A message that cannot be decoded goes to dead letters as it came (body and headers), with the reason. */
  async #deadLetterRaw(message: ConsumeMessage, generation: number, partition: number, reason: string, history: readonly AttemptRecord[]): Promise<void> {
    try {
      const channel = this.#channel;
      if (channel === undefined || generation !== this.#generation) return;
      await confirm(channel, '', this.#names.deadQueue(this.#spec.name), message.content, copyOptions(message, this.#deadHeaders(message, partition, reason, history, attemptsOf(message.properties.headers ?? {}) + 1)));
      if (generation === this.#generation) this.#acks?.ack(message);
      this.#settings.warn(`Subscription ${this.#spec.name}: ${reason}; moved to ${this.#names.deadQueue(this.#spec.name)}`);
    } catch (error) {
      if (!this.#stopping) this.#settings.warn(`Subscription ${this.#spec.name} could not dead-letter an undecodable message; it will be delivered again`, error);
    }
  }

  #deadHeaders(message: ConsumeMessage, partition: number, reason: string, history: readonly AttemptRecord[], attempt: number, envelope?: Envelope): MessagePropertyHeaders {
    return {
      ...cleanHeaders(message.properties.headers),
      ...(envelope === undefined ? {} : attributeHeaders(envelope)),
      [H_DEAD_ID]: newId(),
      [H_DEAD_REASON]: reason.slice(0, 4_000),
      [H_DEAD_AT]: new Date().toISOString(),
      [H_SUBSCRIPTION]: this.#spec.name,
      [H_QUEUE]: this.#names.partition(this.#spec.name, partition),
      [H_PARTITION]: String(partition),
      [H_ATTEMPTS]: attempt,
      [H_HISTORY]: historyHeader(history),
    };
  }

  #channelOf(entry: Entry): ConfirmChannel {
    const channel = this.#channel;
    if (channel === undefined || entry.generation !== this.#generation) {
      throw new TidingsError('BACKBONE_UNAVAILABLE', `The channel that delivered message ${entry.id} closed`, { retryable: true });
    }
    return channel;
  }

  /** Gives up on away places whose message has not come back in time, so their keys move on. */
  #sweep(): void {
    const now = Date.now();
    for (const [key, lane] of this.#lanes) {
      for (const entry of [...lane]) {
        if (entry.state !== 'away' || entry.message !== undefined || entry.giveUpAt > now) continue;
        this.#settings.warn(
          `Subscription ${this.#spec.name}: message ${entry.id} (key ${key}) did not come back from its delay queue within ${this.#settings.retryReturnGraceMs} ms of its due time (another process may have it); later messages of the key go on`,
        );
        this.#done(entry);
      }
    }
    this.#pump();
  }

  #track(task: Promise<void>): void {
    this.#tasks.add(task);
    task.finally(() => this.#tasks.delete(task)).catch(() => undefined);
  }

  /**
   * Graceful: no new handler starts; handlers in flight finish and their outcomes are acknowledged; then the
   * channel closes, which cancels the consumers and returns every message not started to its queue, ahead of
   * the rest, for whichever consumer becomes active next. (Cancelling first would let the next consumer
   * start on later messages while ours were still out.)
   */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopping = true;
    clearInterval(this.#sweeper);
    while (this.#tasks.size > 0) await Promise.allSettled([...this.#tasks]);
    const channel = this.#channel;
    this.#channel = undefined;
    this.#generation++;
    try {
      this.#acks?.flush();
    } catch {
      // Closed already: what was not acknowledged comes again.
    }
    this.#acks = undefined;
    await channel?.close().catch(() => undefined);
    this.#lanes.clear();
    this.#ready.length = 0;
    this.#stopped = true;
  }
}

function confirm(channel: ConfirmChannel, exchange: string, routingKey: string, content: Buffer, options: Parameters<ConfirmChannel['publish']>[3]): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      channel.publish(exchange, routingKey, content, options, (error: unknown) => (error ? reject(error) : resolve()));
    } catch (error) {
      reject(error);
    }
  });
}
