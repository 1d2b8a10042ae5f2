/**
 * One partition of a subscription, read by this process while it is given the partition (workers.ts): the
 * channel's life, and the wiring of the reader's parts (lanes.ts, outcomes.ts, takeover.ts, returns.ts).
 *
 * Channel. A reader has a channel of its own, consuming the partition queue and, once there are holds, its
 * holds queue (both with a single active consumer; holds-queue.ts). Handing the partition over is closing that channel once the handlers in flight
 * are finished and acknowledged: RabbitMQ then returns what was delivered and not acknowledged to the head
 * of the queues and lets the next reader's consumer in. (Cancelling the consumer instead would let the next
 * reader start on later messages while ours were still out.)
 *
 * Topics. A message of a topic the subscription has and this worker has no handler for is never
 * acknowledged, dead-lettered or run past: the reader hands the partition over, to a worker that has the
 * handler. One of a topic that is no longer the subscription's is skipped or dead-lettered once that is
 * sure (RabbitConsumer#unhandled).
 */
import type { ConfirmChannel } from 'amqplib';
import { sleep } from '../../core/sleep.ts';
import { ChannelAcks } from './acks.ts';
import { declareExchanges, declarePartition } from '../topology.ts';
import { HoldsQueue } from './holds-queue.ts';
import { Lanes } from './lanes.ts';
import { Outcomes } from './outcomes.ts';
import { UnstartedReturns } from './returns.ts';
import { readerState, received, type ReaderHost, type ReaderState } from './state.ts';
import { Takeover } from './takeover.ts';
import type { ReaderFacts } from '../observe.ts';

export class PartitionReader {
  readonly index: number;
  readonly #state: ReaderState;
  readonly #holds: HoldsQueue;
  readonly #returns: UnstartedReturns;
  readonly #outcomes: Outcomes;
  readonly #lanes: Lanes;
  readonly #takeover: Takeover;
  /** Whether the subscription gives this process the partition. */
  #wanted = false;
  /** A hand-over pauses reading the partition until then. */
  #notBefore = 0;
  #wake: AbortController | undefined;
  #driving: Promise<void> | undefined;
  /** The partition's queue, bindings and exchanges were declared a moment ago (RabbitConsumer#start). */
  #declared = false;

  constructor(host: ReaderHost, index: number) {
    this.index = index;
    const state = readerState(host, index);
    this.#state = state;
    this.#holds = new HoldsQueue(state, (message, generation) => this.#takeover.onHolds(message, generation));
    this.#returns = new UnstartedReturns(state);
    this.#outcomes = new Outcomes(state, this.#holds);
    this.#lanes = new Lanes(state, this.#outcomes, this.#returns, (pauseMs) => {
      this.#notBefore = Date.now() + pauseMs;
      void this.#drive();
    });
    this.#takeover = new Takeover(state, this.#lanes, this.#returns, this.#holds);
  }

  /**
   * Whether the subscription has just declared this partition's queue and exchanges (RabbitConsumer#start):
   * if so, the next channel need not declare them again (a queue deleted in between makes its consume fail,
   * and the channel after declares).
   */
  justDeclared(yes: boolean): void {
    this.#declared = yes;
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

  /** Gives up on away places whose message has not come back in time, so their keys move on. */
  sweep(): void {
    this.#lanes.sweep();
  }

  /** What it holds of its partition, for the gauges (observe.ts). */
  facts(): ReaderFacts {
    const state = this.#state;
    let unhandled = 0;
    let heldKeys = 0;
    let oldestTime: number | null = null;
    for (const lane of state.lanes.values()) {
      if (lane[0]?.state === 'away') heldKeys++;
      for (const entry of lane) {
        unhandled++;
        const time = entry.decoded === undefined ? Number.NaN : Date.parse(entry.decoded.envelope.time);
        if (time < (oldestTime ?? Number.POSITIVE_INFINITY)) oldestTime = time;
      }
    }
    return {
      partition: this.index,
      reading: state.phase === 'reading' || state.phase === 'restoring',
      unhandled,
      heldKeys,
      // Messages away in a delay queue are not decoded here: their age is not known.
      oldestTime: oldestTime === null && unhandled > 0 ? undefined : oldestTime,
    };
  }

  #drive(): Promise<void> {
    this.#driving ??= this.#steer().finally(() => {
      this.#driving = undefined;
    });
    return this.#driving;
  }

  /** Opens or closes the channel until the phase matches what is wanted; one at a time. */
  async #steer(): Promise<void> {
    const { host } = this.#state;
    const { reconnectMinMs, reconnectMaxMs } = host.settings;
    for (let waitMs = reconnectMinMs; ; ) {
      const pausedMs = this.#notBefore - Date.now();
      if (!this.#wanted || host.link.closed || pausedMs > 0) {
        if (this.#state.phase !== 'idle') await this.#close();
        if (!this.#wanted || host.link.closed) return;
        await this.#nap(pausedMs);
        continue;
      }
      if (this.#state.phase !== 'idle') return;
      try {
        await this.#open();
        waitMs = reconnectMinMs;
      } catch (error) {
        if (host.link.closed) return;
        host.settings.warn(`Subscription ${host.spec.name} could not read partition queue ${this.#state.queue}; retrying in ${waitMs} ms`, error);
        await this.#nap(waitMs);
        waitMs = Math.min(waitMs * 2, reconnectMaxMs);
      }
    }
  }

  /** Sleeps, unless `release()` or the link's closing ends the wait first. */
  async #nap(ms: number): Promise<void> {
    if (ms <= 0) return;
    const { link } = this.#state.host;
    const wake = new AbortController();
    this.#wake = wake;
    const onClose = () => wake.abort();
    link.signal.addEventListener('abort', onClose, { once: true });
    try {
      await sleep(ms, wake.signal).catch(() => undefined);
    } finally {
      link.signal.removeEventListener('abort', onClose);
      this.#wake = undefined;
    }
  }

  async #open(): Promise<void> {
    const state = this.#state;
    const { link, names, settings, spec } = state.host;
    state.phase = 'opening';
    let channel: ConfirmChannel;
    try {
      channel = await link.confirmChannel(Date.now() + settings.connectTimeoutMs);
    } catch (error) {
      state.phase = 'idle';
      throw error;
    }
    try {
      if (!this.#declared) {
        await declareExchanges(channel, names, spec);
        await declarePartition(channel, names, settings, spec, this.index);
      }
      this.#declared = false;
      const generation = ++state.generation;
      const acks = new ChannelAcks(channel);
      state.channel = channel;
      state.acks = acks;
      this.#outcomes.reset();
      channel.once('close', () => this.#lost(generation));
      state.phase = 'waiting';
      await channel.prefetch(settings.prefetch, false);
      await channel.consume(state.queue, (message) => received(channel, acks, message, (delivered) => this.#takeover.arrive(delivered, generation)), {
        noAck: false,
      });
    } catch (error) {
      if (state.channel === channel) {
        state.generation++;
        this.#forgetChannel();
      }
      state.phase = 'idle';
      await channel.close().catch(() => undefined);
      throw error;
    }
  }

  /** The channel closed: what it delivered and we did not acknowledge goes back to the queues by itself. */
  #lost(generation: number): void {
    const state = this.#state;
    if (generation !== state.generation) return;
    this.#forgetChannel();
    for (const [key, lane] of state.lanes) {
      // Keep what runs (its redelivered copy must wait behind it) and the away places (the holds queue gives
      // their records again); what was only delivered comes again.
      const kept = lane.filter((entry) => entry.state === 'running' || entry.state === 'away');
      if (kept.length === 0) state.lanes.delete(key);
      else state.lanes.set(key, kept);
    }
    if (state.phase !== 'releasing') state.phase = 'idle';
    if (!state.host.link.closed) void this.#drive();
  }

  #forgetChannel(): void {
    const state = this.#state;
    state.channel = undefined;
    state.acks?.discard();
    state.acks = undefined;
    state.ready = [];
    this.#holds.reset();
    this.#outcomes.reset();
    this.#returns.reset();
    this.#takeover.reset();
  }

  /**
   * Graceful: no new handler starts; handlers in flight finish and their outcomes are acknowledged; then the
   * channel closes, which returns every message not started (and every hold record) to its queue, ahead of
   * the rest, for whichever reader comes next.
   */
  async #close(): Promise<void> {
    const state = this.#state;
    const wasReading = state.phase === 'reading';
    state.phase = 'releasing';
    while (state.tasks.size > 0) await Promise.allSettled([...state.tasks]);
    const channel = state.channel;
    if (wasReading && channel !== undefined) await this.#returns.say(channel, this.#holds.consumed);
    state.generation++;
    try {
      state.acks?.flush();
    } catch {
      // Closed already: what was not acknowledged comes again.
    }
    this.#forgetChannel();
    await channel?.close().catch(() => undefined);
    state.lanes.clear();
    state.phase = 'idle';
  }
}
