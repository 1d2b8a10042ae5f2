import type { SubscriptionSpec } from '../../core/backbone.ts';
import { toEnvelope, type LogRow } from '../codec.ts';
import { ackStatement, deadRow, type Acknowledgement, type DeadRow, type HeldRow } from './acknowledgement.ts';
import type { Attempts } from './attempts.ts';
import type { ConsumerContext } from './context.ts';
import type { HeldKeys } from './held.ts';
import type { Lane, LaneCursor, ReadBatch } from './lanes.ts';
import { fenceError } from './leases.ts';
import { forEachSlot } from './fair.ts';
import { SharedScope } from './scopes.ts';

/**
 * Fewest messages per sub-batch: each costs its own begin, acknowledgement and commit (and a pool
 * connection publishers may be waiting for), worth it only when it spares many statements in line.
 */
const MIN_SUB_BATCH = 32;

/** A part of a batch, handled in its own transaction and acknowledged (fenced) for its own lanes. */
interface BatchPart {
  readonly rows: LogRow[];
  readonly lanes: Lane[];
  /** Its share of the subscription's concurrency. */
  readonly concurrency: number;
}

/** An acknowledgement in flight while the next batch is handled (see `BatchHandler.handle`, `overlap`). */
export interface Acking {
  readonly done: Promise<void>;
  /** Where its batch's lanes were: they go back there if it fails. */
  readonly before: ReadonlyArray<[Lane, LaneCursor]>;
  /** Message ids it records in the inbox: reads sent before it commits do not see them. */
  readonly handled: ReadonlySet<string>;
}

/** One part of a read batch to handle and acknowledge. */
interface BatchRun {
  readonly read: ReadBatch;
  readonly part: BatchPart;
  /** Messages per partition in the whole batch (the cursors' `handled` counters). */
  readonly counts: ReadonlyMap<number, number>;
  /** The acknowledgement before this one, still in flight: this one is sent once it has committed. */
  readonly previous: Acking | undefined;
  /** If the handlers only acknowledge, do not wait for the acknowledgement: hand it back in flight. */
  readonly overlap: boolean;
}

interface BatchOutcome {
  /** A handler wrote through `ctx.tx` (the next batch is split, see `splitBatch`). */
  readonly wrote: boolean;
  /** Ids recorded in the inbox. */
  readonly handled: string[];
  /** The acknowledgement, still in flight, when `overlap` let it be. */
  readonly acking?: Promise<void>;
}

/** The batch's transaction was abandoned: a handler that wrote through it failed. Replay the batch with savepoints. */
class ReplayCarefully extends Error {}

/**
 * Splits a batch by partition into sub-batches, each handled in its own transaction on its own connection
 * and acknowledged (fenced) for its own lanes. Handlers that write through `ctx.tx` share their
 * sub-batch's connection, one statement at a time, so more connections let more of them write at once.
 * A key lives in one partition, so its messages stay in one sub-batch, in order. `connections` is 1 unless
 * the last batch's handlers wrote: handlers that never write keep one acknowledgement per batch.
 *
 * `concurrency` is shared, not multiplied: each sub-batch gets a fixed part of it, by its number of keys.
 * A fixed part, not a common pool: a sub-batch waiting for a connection from a busy pool must not hold
 * slots that the sub-batches already holding connections need to finish and give theirs back.
 */
export function splitBatch(read: ReadBatch, counts: ReadonlyMap<number, number>, concurrency: number, connections: number): BatchPart[] {
  const { rows: batch, partitionOf, withRows: lanes } = read;
  const withRows = lanes.filter((lane) => (counts.get(lane.partition) ?? 0) > 0);
  const n = Math.min(connections, concurrency, withRows.length, Math.floor(batch.length / MIN_SUB_BATCH));
  if (n <= 1) return [{ rows: batch, lanes, concurrency }];
  const parts = Array.from({ length: n }, () => ({ rows: [] as LogRow[], lanes: [] as Lane[], size: 0, keys: new Set<string>(), concurrency: 1 }));
  // Largest lanes first, each to the sub-batch with the fewest messages so far.
  const partOf = new Map<number, (typeof parts)[number]>();
  for (const lane of [...withRows].sort((a, b) => counts.get(b.partition)! - counts.get(a.partition)!)) {
    const part = parts.reduce((least, candidate) => (candidate.size < least.size ? candidate : least));
    part.lanes.push(lane);
    part.size += counts.get(lane.partition)!;
    partOf.set(lane.partition, part);
  }
  // Lanes of a group that had rows, but none of their own: acknowledged with the first sub-batch.
  for (const lane of lanes) if (!partOf.has(lane.partition)) parts[0]!.lanes.push(lane);
  for (const row of batch) {
    const part = partOf.get(partitionOf.get(row)!)!;
    part.rows.push(row);
    part.keys.add(row.key);
  }
  for (let spare = concurrency - n; spare > 0; spare--) {
    const hungriest = parts.reduce((best, part) => (part.keys.size / part.concurrency > best.keys.size / best.concurrency ? part : best));
    if (hungriest.keys.size <= hungriest.concurrency) break;
    hungriest.concurrency++;
  }
  return parts.map(({ rows, lanes: own, concurrency: share }) => ({ rows, lanes: own, concurrency: share }));
}

/**
 * Handles a batch (part) and acknowledges it. Fast mode runs the handlers without savepoints: handlers that
 * never touch `ctx.tx` need no transaction at all, and the acknowledgement is one statement. If a handler
 * that wrote through `ctx.tx` fails, its writes cannot be undone alone, so the batch is rolled back and
 * run again carefully: each attempt in its own savepoint (see AttemptScope).
 */
export class BatchHandler {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #owner: string;
  readonly #attempts: Attempts;
  readonly #held: HeldKeys;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec, owner: string, attempts: Attempts, held: HeldKeys) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#owner = owner;
    this.#attempts = attempts;
    this.#held = held;
  }

  /** Handles `run`, fast first, carefully if a handler that wrote failed. */
  async handle(run: BatchRun): Promise<BatchOutcome> {
    try {
      return await this.#handle(run, false);
    } catch (error) {
      if (!(error instanceof ReplayCarefully)) throw error;
      return await this.#handle(run, true);
    }
  }

  async #handle({ read, part, counts, previous, overlap }: BatchRun, replaying: boolean): Promise<BatchOutcome> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const published = new Set<string>();
    const parkedNow = new Set<string>();
    const held: HeldRow[] = [];
    const dead: DeadRow[] = [];
    const handledIds: string[] = [];
    const claimed = new Set<string>();
    let earliestRetry = 0;
    // Under tenant isolation too, fast first: each handler statement in its tenant's scope (SharedScope.query).
    const scope = new SharedScope(driver, published, replaying, this.#ctx.isolation);

    const handleAll = async () => {
      await forEachSlot(
        this.#ctx.isolation !== undefined && spec.tenantShares === undefined ? byTenant(groupByKey(part.rows)) : groupByKey(part.rows),
        part.concurrency,
        (group) => group[0]!.tenant ?? '',
        spec.tenantShares,
        async (group) => {
          let holding = this.#held.isParked(group[0]!.key);
          for (const row of group) {
            const partition = read.partitionOf.get(row)!;
            const position = Number(row.position);
            if (holding) {
              held.push({ partition, key: row.key, position, message: null, attempts: 0, next_attempt_at: null, history: [] });
              continue;
            }
            // Handled before: a redelivery, or a publisher that sent it twice.
            if (row.seen === true || read.handledBefore.has(row.id)) continue;
            if (this.#ctx.suspended?.has(row.tenant) === true) {
              // Its tenant is suspended: it waits in held, at the head of its key, due again on resume.
              held.push({ partition, key: row.key, position, message: null, attempts: 0, next_attempt_at: null, history: [] });
              holding = true;
              parkedNow.add(row.key);
              continue;
            }
            if (spec.inbox) {
              // The same id twice in one batch (a publish retried after a commit whose answer was lost).
              if (claimed.has(row.id)) continue;
              claimed.add(row.id);
            }
            const envelope = toEnvelope(row);
            const result = await this.#attempts.run(scope, envelope, 1, []);
            if (result.kind === 'ack') {
              if (spec.inbox) handledIds.push(row.id);
              continue;
            }
            if (result.kind === 'dead') {
              dead.push(deadRow(spec.name, envelope, position, result.reason, result.history));
              continue;
            }
            const at = Date.now() + result.delayMs;
            earliestRetry = earliestRetry === 0 ? at : Math.min(earliestRetry, at);
            held.push({
              partition,
              key: row.key,
              position,
              message: null,
              attempts: result.attempt,
              next_attempt_at: new Date(at).toISOString(),
              history: result.history,
            });
            holding = true;
            parkedNow.add(row.key);
          }
        },
      );
    };

    const acknowledgement: Acknowledgement = { lanes: part.lanes, next: read.next, counts, handledIds, held, dead };
    const ack = (duplicates: 'skip' | 'fail') => ackStatement(sql, spec, this.#owner, acknowledgement, duplicates);
    const fenced = (error: unknown): never => {
      throw fenceError(error);
    };
    // Acknowledgements commit in order: each is sent once the one before it has committed.
    try {
      try {
        await handleAll();
        if (scope.abandoned) throw new ReplayCarefully();
        await previous?.done;
      } catch (error) {
        if (scope.open) await scope.rollback();
        throw error;
      }
      // In the handlers' transaction, the acknowledgement travels with its COMMIT; without one, it commits alone.
      if (scope.open) await scope.commit(ack('skip'));
      else if (overlap && held.length === 0 && dead.length === 0 && published.size === 0) {
        // Nothing else waits for it: no held key, no retry, no dead letter, no write. The next batch is
        // handled while it commits; if it fails, the loop puts the lanes back and reads both batches again.
        const acking = this.#ctx.acks.commit(ack).then(() => undefined, fenced);
        acking.catch(() => undefined);
        return { wrote: false, handled: handledIds, acking };
      } else await this.#ctx.acks.commit(ack);
    } catch (error) {
      fenced(error);
    }
    this.#held.parked(parkedNow, earliestRetry);
    if (published.size > 0) this.#ctx.committed(published);
    return { wrote: scope.open, handled: handledIds };
  }
}

/**
 * Key groups of one tenant next to one another (stable: in read order within a tenant). Under isolation a
 * handler statement enters its tenant's scope unless that scope is in force: handlers started side by side
 * are then mostly of one tenant, and most of their statements need no scope entry of their own.
 */
function byTenant(groups: LogRow[][]): LogRow[][] {
  const tenants = new Map<string, LogRow[][]>();
  for (const group of groups) {
    const tenant = group[0]!.tenant ?? '';
    const list = tenants.get(tenant);
    if (list === undefined) tenants.set(tenant, [group]);
    else list.push(group);
  }
  return [...tenants.values()].flat();
}

/** Groups rows by key, keeping the order of first appearance and the order within each key. */
function groupByKey(rows: LogRow[]): LogRow[][] {
  const groups = new Map<string, LogRow[]>();
  for (const row of rows) {
    const group = groups.get(row.key);
    if (group === undefined) groups.set(row.key, [row]);
    else group.push(row);
  }
  return [...groups.values()];
}
