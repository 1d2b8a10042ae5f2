/**
 * A partition's messages lined up per key in arrival order (a lane): a key runs one message at a time, and
 * the subscription's readers in this process run up to `concurrency` keys at once (slots.ts).
 *
 * Held keys. A message retried after a delay is away in a delay queue, its place at the head of its key's
 * lane kept: later messages of the key wait behind it, in order, until it comes back through the return
 * exchange and is handled. Other keys flow. Held messages take prefetch slots; so that a long hold cannot
 * fill the prefetch window (and keep the retried message itself from being delivered), once the partition
 * holds `prefetch / 2` messages behind away keys, the earliest of them go to the delay queue too and keep
 * their places in the lane ("away" as well, with a hold record each): however they come back, they run in
 * lane order. A place whose message does not come back within its delay plus `retryReturnGraceMs` is given
 * up, with a warning.
 */
import type { ConsumeMessage } from 'amqplib';
import { describeError, TidingsError } from '../../core/errors.ts';
import { Arrivals } from '../../telemetry/arrivals.ts';
import { decode } from '../codec.ts';
import type { Outcomes, Settled } from './outcomes.ts';
import type { UnstartedReturns } from './returns.ts';
import { ackRecord, track, type Entry, type ReaderState } from './state.ts';

/** A parked message waits at least this long: a head that is overdue must not make its followers spin. */
const PARK_MIN_MS = 250;

export class Lanes {
  readonly #state: ReaderState;
  readonly #outcomes: Outcomes;
  readonly #returns: UnstartedReturns;
  /** A head of a topic this worker has no handler for: the partition goes back to its queue for `pauseMs`. */
  readonly #handOver: (pauseMs: number) => void;
  readonly #pump = () => this.run();
  /** The receive spans of what the partition queue delivers. */
  readonly #arrivals: Arrivals;

  constructor(state: ReaderState, outcomes: Outcomes, returns: UnstartedReturns, handOver: (pauseMs: number) => void) {
    this.#state = state;
    this.#outcomes = outcomes;
    this.#returns = returns;
    this.#handOver = handOver;
    const { settings, spec } = state.host;
    this.#arrivals = new Arrivals(() => settings.observer?.()?.receiving('rabbitmq', spec.name), state.index);
  }

  /** A delivery from the partition queue joins its key's lane, or takes back its away place. */
  place(message: ConsumeMessage, generation: number): void {
    const state = this.#state;
    const decoded = decode(message, this.#exchangeTopic(message));
    const unstarted = this.#returns.take(decoded.ok ? decoded.value.envelope.id : decoded.id);
    if (!decoded.ok) {
      const reason = `UNDECODABLE_MESSAGE: message ${decoded.id ?? `(no id, delivery ${message.fields.deliveryTag})`} in queue ${state.queue} cannot be decoded: ${decoded.problem}`;
      const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, decoded.id === undefined ? {} : { ref: { id: decoded.id } }));
      track(state, this.#outcomes.deadLetterRaw({ message, generation, reason, history: [{ attempt: 1, at: new Date().toISOString(), error }] }));
      return;
    }
    const { envelope } = decoded.value;
    this.#arrivals.add(envelope);
    const key = envelope.partitionkey;
    let lane = state.lanes.get(key);
    const away = lane?.find((entry) => entry.state === 'away' && entry.id === envelope.id && entry.message === undefined);
    if (away !== undefined) {
      // A retried (or parked) message is back: it takes its place again.
      away.state = 'local';
      away.message = message;
      away.decoded = decoded.value;
      away.generation = generation;
      away.unstarted = unstarted;
      if (lane![0] === away) state.ready.push(key);
      else if (lane![0]!.state === 'away') this.relieve();
      this.run();
      return;
    }
    if (lane === undefined) {
      lane = [];
      state.lanes.set(key, lane);
    }
    const seq = lane.length === 0 ? 0 : lane[lane.length - 1]!.seq + 1;
    lane.push({ key, id: envelope.id, seq, state: 'local', message, decoded: decoded.value, generation, giveUpAt: 0, dueAt: 0, record: undefined, unstarted });
    if (lane.length === 1) {
      state.ready.push(key);
      this.run();
      return;
    }
    if (lane[0]!.state === 'away') this.relieve();
  }

  /** The topic whose exchange the message came through, if it came through one (not the return exchange). */
  #exchangeTopic(message: ConsumeMessage): string | undefined {
    const exchange = message.fields.exchange;
    const prefix = this.#state.host.names.prefix;
    return exchange.startsWith(prefix) && !exchange.includes(':') ? exchange.slice(prefix.length) : undefined;
  }

  /**
   * Keeps the messages held behind away keys to half the prefetch window, parking some in a delay queue:
   * otherwise held messages could fill the window and keep the very message they wait for from being
   * delivered. Called when a message joins a held key and when a key becomes held. A lane's earliest local
   * messages are parked first, so that its messages that never left the partition queue always come after
   * its held records: a reader taking the partition over puts those records first and the returned messages
   * after them, in order. (Test: faults.rabbitmq 'kill -9 while a key waits ..., parked in the delay queue'.)
   */
  relieve(): void {
    const state = this.#state;
    if (state.phase !== 'reading') return;
    const heldLanes = [...state.lanes.values()].filter((lane) => lane[0]!.state === 'away');
    let excess = -Math.floor(state.host.settings.prefetch / 2);
    for (const lane of heldLanes) for (const entry of lane) if (entry.state === 'local') excess++;
    for (const lane of heldLanes) {
      const head = lane[0]!;
      for (const entry of lane) {
        if (excess <= 0) return;
        if (entry.state !== 'local') continue;
        excess--;
        track(state, this.#park(entry, Math.max(head.dueAt - Date.now(), PARK_MIN_MS)));
      }
    }
  }

  /** Starts the lane heads that can run, as long as the subscription has free slots. */
  run(): void {
    const state = this.#state;
    const { slots, spec } = state.host;
    while (state.phase === 'reading' && state.ready.length > 0) {
      const key = state.ready[0]!;
      const head = state.lanes.get(key)?.[0];
      if (head === undefined || head.state !== 'local') {
        state.ready.shift();
        continue;
      }
      const topic = head.decoded!.envelope.topic;
      const unhandled = spec.topics.includes(topic)
        ? undefined
        : state.host.unhandled(state.index, topic, head.id, this.#exchangeTopic(head.message!) === topic);
      if (unhandled?.action === 'hand-over') {
        // Not acknowledged, not run past: the partition goes back to its queue, for a worker that handles it.
        this.#handOver(unhandled.pauseMs);
        return;
      }
      if (!slots.take()) {
        slots.wait(this.#pump);
        return;
      }
      state.ready.shift();
      head.state = 'running';
      const outcome: Promise<Settled> =
        unhandled === undefined
          ? this.#outcomes.handle(head)
          : unhandled.action === 'skip'
            ? this.#outcomes.skip(head)
            : this.#outcomes.refuse(head, unhandled.reason);
      track(
        state,
        outcome
          .then((settled) => (settled === 'away' ? this.relieve() : this.done(head)))
          .finally(() => {
            slots.give();
            this.run();
          }),
      );
    }
  }

  /** The head of a lane is finished: its hold record goes, and the next message of the key, if any, may run. */
  done(entry: Entry): void {
    const state = this.#state;
    if (entry.record !== undefined) ackRecord(state, entry.record);
    entry.record = undefined;
    const lane = state.lanes.get(entry.key);
    if (lane === undefined) return;
    const index = lane.indexOf(entry);
    if (index >= 0) lane.splice(index, 1);
    if (lane.length === 0) state.lanes.delete(entry.key);
    else if (index === 0 && lane[0]!.state === 'local') state.ready.push(entry.key);
    else if (index === 0 && lane[0]!.state === 'away') this.relieve();
  }

  /** A message held behind an away key leaves the prefetch window: it waits in the delay queue, keeping its place. */
  async #park(entry: Entry, delayMs: number): Promise<void> {
    const state = this.#state;
    entry.state = 'moving';
    try {
      await this.#outcomes.sendToDelay(entry, delayMs, {});
    } catch (error) {
      const lane = state.lanes.get(entry.key);
      if (lane === undefined || !lane.includes(entry)) return;
      if (state.phase !== 'releasing')
        state.host.settings.warn(`Subscription ${state.host.spec.name} could not park message ${entry.id} of a held key; it stays in memory`, error);
      entry.state = 'local';
      if (lane[0] === entry) {
        state.ready.push(entry.key);
        this.run();
      }
    }
  }

  /** Gives up on away places whose message has not come back in time, so their keys move on. */
  sweep(): void {
    const state = this.#state;
    if (state.phase !== 'reading') return;
    const now = Date.now();
    for (const [key, lane] of state.lanes) {
      for (const entry of [...lane]) {
        if (entry.state !== 'away' || entry.message !== undefined || entry.giveUpAt > now) continue;
        state.host.settings.warn(
          `Subscription ${state.host.spec.name}: message ${entry.id} (key ${key}) did not come back from its delay queue within ${state.host.settings.retryReturnGraceMs} ms of its due time; later messages of the key go on`,
        );
        this.done(entry);
      }
    }
    this.run();
  }
}
