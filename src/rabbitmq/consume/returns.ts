/**
 * Returns that were not attempts (holds.ts, "returned" records): a reader that lets go of the partition
 * gracefully says which messages it hands back without having started them, and the next reader takes those
 * returns off their attempt counts, so that a partition changing hands does not use up its messages' retries.
 */
import type { ConfirmChannel } from 'amqplib';
import { returnedMessage, type Unstarted } from '../holds.ts';
import { declareHolds } from '../topology.ts';
import { ackRecord, sendConfirmed, type Delivered, type ReaderState } from './state.ts';

/** Messages a "returned" record names at most (holds.ts): a partition's prefetch window, many times over. */
const MAX_UNSTARTED = 10_000;

export class UnstartedReturns {
  readonly #state: ReaderState;
  /** Messages the previous readers returned unstarted, not delivered here yet, and their records. */
  #unstarted = new Map<string, number>();
  #records: Delivered[] = [];

  constructor(state: ReaderState) {
    this.#state = state;
  }

  /** A "returned" record the previous readers left, read while taking the partition over. */
  add(unstarted: Unstarted, record: Delivered): void {
    for (const [id, count] of Object.entries(unstarted)) this.#unstarted.set(id, (this.#unstarted.get(id) ?? 0) + count);
    this.#records.push(record);
  }

  /** How many returns of message `id` were not attempts; once every such message is here, their records go. */
  take(id: string | undefined): number {
    if (id === undefined || this.#unstarted.size === 0) return 0;
    const count = this.#unstarted.get(id) ?? 0;
    this.#unstarted.delete(id);
    if (this.#unstarted.size === 0) {
      for (const record of this.#records) ackRecord(this.#state, record);
      this.#records = [];
    }
    return count;
  }

  /**
   * Before the channel closes: records which messages go back to the partition queue without having been
   * started (those delivered here, and those the previous readers returned that did not come here yet), so
   * that the next reader does not count those returns as attempts; the records it replaces go.
   */
  async say(channel: ConfirmChannel, holdsDeclared: boolean): Promise<void> {
    const state = this.#state;
    const unstarted: Record<string, number> = Object.fromEntries(this.#unstarted);
    for (const lane of state.lanes.values()) {
      for (const entry of lane) if (entry.state === 'local' && entry.generation === state.generation) unstarted[entry.id] = entry.unstarted + 1;
    }
    const ids = Object.keys(unstarted);
    try {
      if (ids.length > 0) {
        const returned = returnedMessage(Object.fromEntries(ids.slice(0, MAX_UNSTARTED).map((id) => [id, unstarted[id]!])));
        if (!holdsDeclared) await declareHolds(channel, state.host.names, state.host.settings, state.host.spec.name, state.index);
        await sendConfirmed(channel, state.holdsQueue, returned.body, returned.options);
      }
      for (const record of this.#records) ackRecord(state, record);
    } catch {
      // Not recorded: the next reader counts these returns as attempts, as after a crash.
    }
  }

  /** The channel is gone: what the records said comes again with them. */
  reset(): void {
    this.#unstarted = new Map();
    this.#records = [];
  }
}
