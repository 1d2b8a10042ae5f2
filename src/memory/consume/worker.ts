import { AsyncResource } from 'node:async_hooks';
import { runAttempts } from '../../core/attempts.ts';
import type { Consumer, DeliveryHandler, SubscriptionSpec } from '../../core/backbone.ts';
import type { MemoryTransaction } from '../transaction.ts';
import { TenantSlots } from './fair.ts';
import type { Group } from './group.ts';
import type { Entry, GroupContext, KeyLine, Lane, LaneHolder } from './state.ts';

/** Handlers started back to back before a worker yields to timers and I/O: all-synchronous handlers never would. */
const DISPATCHES_PER_TURN = 256;

/**
 * One `consume` call: handles the ready keys of the lanes it holds, up to `concurrency` at once, one
 * message per key at a time. Handlers start in the async context of the `consume` call, not in that of
 * whichever publisher or handler made their message ready.
 */
export class MemoryWorker implements Consumer, LaneHolder {
  /** Lanes this worker holds that have a ready key, in round-robin order. */
  readonly readyLanes = new Set<Lane>();
  /** The topics this worker has handlers for. */
  readonly topics: readonly string[];
  readonly #group: Group;
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<MemoryTransaction>;
  readonly #ctx: GroupContext;
  readonly #scope = new AsyncResource('tidings.memory.worker');
  readonly #running = new Set<Promise<void>>();
  #inFlight = 0;
  #scheduled = false;
  #dispatched = 0;
  #stopping = false;
  #stopped: Promise<void> | undefined;
  /** With `tenantConcurrency` or `tenantWeights`: the slots shared between tenants. */
  readonly #slots: TenantSlots | undefined;

  constructor(group: Group, spec: SubscriptionSpec, handle: DeliveryHandler<MemoryTransaction>, ctx: GroupContext) {
    this.topics = spec.topics;
    this.#group = group;
    this.#spec = spec;
    this.#handle = handle;
    this.#ctx = ctx;
    this.#slots = spec.tenantShares === undefined ? undefined : new TenantSlots(spec.tenantShares);
  }

  /** Pumps on a later turn of the event loop (coalesced). */
  schedule(): void {
    if (this.#scheduled || this.#stopping) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      this.#dispatched = 0;
      this.#scope.runInAsyncScope(() => this.#pump());
    });
  }

  /** Takes the ready keys' heads it has room for (one read: one receive span, while tracing), then runs them. */
  #pump(): void {
    const received = this.#ctx.observer()?.receiving('memory', this.#group.name);
    const taken: Array<{ line: KeyLine; entry: Entry }> = [];
    while (!this.#stopping && this.#inFlight < this.#spec.concurrency) {
      if (this.#dispatched >= DISPATCHES_PER_TURN) {
        this.schedule();
        break;
      }
      const next = this.#group.take(this, this.#slots);
      if (next === undefined) break;
      this.#slots?.started(next.entry.message.envelope.tenant ?? '');
      this.#dispatched++;
      this.#inFlight++;
      taken.push(next);
    }
    received?.(taken.map((next) => next.entry.message.envelope));
    for (const next of taken) {
      const running = this.#run(next.line, next.entry).catch((error: unknown) => {
        this.#ctx.warn(`Subscription ${this.#group.name}: internal error of the memory backbone while handling a message (a bug: please report it)`, error);
      });
      this.#running.add(running);
      void running.finally(() => this.#running.delete(running));
    }
  }

  /** Attempts the key's head until it is acknowledged, dead-lettered or must wait (core/attempts.ts); then frees the key. */
  async #run(line: KeyLine, entry: Entry): Promise<void> {
    const group = this.#group;
    let how: 'done' | 'wait' | 'again' = 'done';
    let delayMs = 0;
    try {
      const { envelope, json } = entry.message;
      // A redriven or re-published message this subscription already handled.
      if (group.inbox && group.handled(envelope.id)) return;
      const result = await runAttempts(this.#handle, {
        first: entry.attempts + 1,
        history: entry.history,
        retry: this.#spec.retry,
        // Each attempt parses its own copy of the data, as a real backbone would hand it over.
        envelope: () => ({ ...envelope, data: JSON.parse(json) as unknown }),
        open: (attempt) => {
          entry.attempts = attempt;
          const tx = this.#ctx.begin(`the transaction of attempt ${attempt} at message ${envelope.id} (${envelope.topic}) in subscription ${group.name}`);
          return {
            tx,
            end: async (keep) => {
              // The inbox record and what the handler published become visible together, as in one commit.
              if (keep && group.inbox) group.remember(envelope.id);
              this.#ctx.end(tx, keep);
              return undefined;
            },
          };
        },
        stopping: () => this.#stopping,
      });
      if (result.kind === 'dead') this.#ctx.deadLetter(group.name, entry, result.reason);
      else if (result.kind === 'retry' && result.delayMs > 0) {
        how = 'wait';
        delayMs = result.delayMs;
      } else if (result.kind === 'retry') how = 'again';
    } finally {
      this.#inFlight--;
      this.#slots?.ended(entry.message.envelope.tenant ?? '');
      group.release(line, entry, how, delayMs);
      if (!this.#stopping) this.#pump();
    }
  }

  /** Graceful: takes no new message, lets those in flight finish, then hands its lanes to the other workers. */
  stop(): Promise<void> {
    this.#stopping = true;
    this.#stopped ??= (async () => {
      while (this.#running.size > 0) await Promise.allSettled([...this.#running]);
      this.#group.detach(this);
    })();
    return this.#stopped;
  }
}
