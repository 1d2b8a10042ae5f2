/**
 * Taking a partition over: on the first delivery the reader is the partition's active consumer, and before
 * it handles anything it picks up the partition's holds (holds.ts): none if the partition has no holds queue
 * (no key of it was ever held); else every record, which come before a marker of this reader's own. Held
 * keys get their away places again, in lane order, ahead of anything delivered meanwhile.
 */
import type { ConfirmChannel, ConsumeMessage } from 'amqplib';
import { newId } from '../../core/envelope.ts';
import { markerMessage, readHoldsMessage, type HoldRecord, type Unstarted } from '../holds.ts';
import type { HoldsQueue } from './holds-queue.ts';
import type { Lanes } from './lanes.ts';
import type { UnstartedReturns } from './returns.ts';
import { ackRecord, sendConfirmed, type Delivered, type Entry, type ReaderState } from './state.ts';

export class Takeover {
  readonly #state: ReaderState;
  readonly #lanes: Lanes;
  readonly #returns: UnstartedReturns;
  readonly #holds: HoldsQueue;
  /** Delivered while restoring: placed once the holds are known. */
  #buffered: ConsumeMessage[] = [];
  #restored: Array<{ record: HoldRecord; delivered: Delivered }> = [];
  #restoredReturns: Array<{ unstarted: Unstarted; delivered: Delivered }> = [];
  #marker: string | undefined;
  #markerTimer: NodeJS.Timeout | undefined;

  constructor(state: ReaderState, lanes: Lanes, returns: UnstartedReturns, holds: HoldsQueue) {
    this.#state = state;
    this.#lanes = lanes;
    this.#returns = returns;
    this.#holds = holds;
  }

  /** The channel is gone: what was read of the holds comes again on the next. */
  reset(): void {
    this.#buffered = [];
    this.#restored = [];
    this.#restoredReturns = [];
    this.#marker = undefined;
    clearTimeout(this.#markerTimer);
  }

  /** A delivery from the partition queue. */
  arrive(message: ConsumeMessage, generation: number): void {
    const state = this.#state;
    if (generation !== state.generation) return;
    if (state.phase === 'waiting') {
      // The first message: this reader is the partition's active consumer now. Holds first.
      state.phase = 'restoring';
      this.#buffered.push(message);
      void this.#takeOver(generation);
      return;
    }
    if (state.phase === 'restoring') {
      this.#buffered.push(message);
      return;
    }
    this.#lanes.place(message, generation);
  }

  /**
   * Picks up the partition's holds before reading it: none if it has no holds queue (no key of it was ever
   * held); else every record, which come before a marker of this reader's own (holds.ts).
   */
  async #takeOver(generation: number): Promise<void> {
    const state = this.#state;
    const channel = state.channel!;
    try {
      if (!(await this.#holdsExist())) {
        if (generation === state.generation && state.phase === 'restoring') this.#restore();
        return;
      }
      if (generation !== state.generation) return;
      await this.#holds.read(channel, generation);
      if (generation !== state.generation || state.phase !== 'restoring') return;
      this.#sendMarker(channel, generation);
    } catch (error) {
      if (generation !== state.generation) return;
      state.host.settings.warn(`Subscription ${state.host.spec.name} could not read the holds of ${state.queue}; starting over`, error);
      channel.close().catch(() => undefined);
    }
  }

  /** Whether the partition has a holds queue; looked up on a channel of its own, which a missing queue closes. */
  async #holdsExist(): Promise<boolean> {
    const { host, holdsQueue } = this.#state;
    const probe = await host.link.confirmChannel(Date.now() + host.settings.connectTimeoutMs);
    try {
      await probe.checkQueue(holdsQueue);
      return true;
    } catch (error) {
      if ((error as { code?: unknown }).code === 404) return false;
      throw error;
    } finally {
      await probe.close().catch(() => undefined);
    }
  }

  #sendMarker(channel: ConfirmChannel, generation: number): void {
    const state = this.#state;
    const { host } = state;
    const token = newId();
    this.#marker = token;
    const marker = markerMessage({ worker: host.workers.self.id, token });
    sendConfirmed(channel, state.holdsQueue, marker.body, marker.options).catch(() => channel.close().catch(() => undefined));
    this.#markerTimer = setTimeout(() => {
      if (generation !== state.generation || state.phase !== 'restoring') return;
      host.settings.warn(
        `Subscription ${host.spec.name}: the holds of partition queue ${state.queue} did not arrive within ${host.settings.workerTimeoutMs} ms (another worker holds ${state.holdsQueue}?); starting over`,
      );
      channel.close().catch(() => undefined);
    }, host.settings.workerTimeoutMs);
    this.#markerTimer.unref();
  }

  /** A delivery from the holds queue: a hold record, a marker, a "returned" record. */
  onHolds(message: ConsumeMessage, generation: number): void {
    const state = this.#state;
    if (generation !== state.generation) return;
    const delivered: Delivered = { message, generation };
    const read = readHoldsMessage(message);
    if (read.kind === 'unknown') {
      state.host.settings.warn(
        `Subscription ${state.host.spec.name}: dropped a message in ${state.holdsQueue} that is neither a hold nor a marker (put there by hand?)`,
      );
      state.acks?.ack(message);
      return;
    }
    if (read.kind === 'marker') {
      const { marker } = read;
      if (marker.token === this.#marker) {
        state.acks?.ack(message);
        // Not if the partition is being let go of meanwhile: nothing more starts.
        if (state.phase === 'restoring') this.#restore();
        return;
      }
      // A marker of a reader that has gone (before it got its own back): ahead of ours.
      state.acks?.ack(message);
      return;
    }
    if (read.kind === 'returned') {
      if (state.phase === 'restoring') this.#restoredReturns.push({ unstarted: read.unstarted, delivered });
      // Releasing: our own, published as the channel closes; it goes back to the queue with it, for the next reader.
      else if (state.phase !== 'releasing') state.acks?.ack(message);
      return;
    }
    if (state.phase === 'restoring') {
      this.#restored.push({ record: read.record, delivered });
      return;
    }
    // One of our own records, back from the holds queue.
    const entry = state.lanes.get(read.record.key)?.find((e) => e.id === read.record.id);
    if (entry === undefined) {
      ackRecord(state, delivered);
      return;
    }
    if (entry.record !== undefined) ackRecord(state, entry.record);
    entry.record = delivered;
  }

  /**
   * The marker is back: every hold record of the partition came before it. Held keys get their away places
   * again, in lane order, ahead of anything delivered since; then reading starts.
   */
  #restore(): void {
    const state = this.#state;
    clearTimeout(this.#markerTimer);
    const byKey = new Map<string, Array<{ record: HoldRecord; delivered: Delivered }>>();
    for (const held of this.#restored) byKey.set(held.record.key, [...(byKey.get(held.record.key) ?? []), held]);
    const kept = new Set<Entry>();
    for (const [key, records] of byKey) this.#restoreKey(key, records, kept);
    // Away places kept from a lost channel without a record now were finished by another reader meanwhile.
    for (const [key, lane] of state.lanes) {
      const left = lane.filter((entry) => entry.state !== 'away' || kept.has(entry));
      if (left.length === 0) state.lanes.delete(key);
      else state.lanes.set(key, left);
    }
    for (const { unstarted, delivered } of this.#restoredReturns) this.#returns.add(unstarted, delivered);
    this.#restored = [];
    this.#restoredReturns = [];
    this.#marker = undefined;
    state.phase = 'reading';
    const buffered = this.#buffered;
    this.#buffered = [];
    for (const message of buffered) this.#lanes.place(message, state.generation);
    this.#lanes.run();
  }

  /** A held key's lane as its records say: what runs still, then its away places in lane order. */
  #restoreKey(key: string, records: Array<{ record: HoldRecord; delivered: Delivered }>, kept: Set<Entry>): void {
    const state = this.#state;
    const grace = state.host.settings.retryReturnGraceMs;
    records.sort((a, b) => a.record.seq - b.record.seq);
    const lane = state.lanes.get(key) ?? [];
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
          generation: state.generation,
          dueAt: record.dueAt,
          giveUpAt: record.dueAt + grace,
          record: undefined,
          unstarted: 0,
        };
      } else if (entry.state === 'away') {
        entry.dueAt = Math.max(entry.dueAt, record.dueAt);
        entry.giveUpAt = entry.dueAt + grace;
      }
      if (entry.record !== undefined) ackRecord(state, entry.record);
      entry.record = delivered;
      if (entry.state === 'away' && !away.includes(entry)) away.push(entry);
      kept.add(entry);
    }
    state.lanes.set(key, [...running, ...away]);
  }
}
