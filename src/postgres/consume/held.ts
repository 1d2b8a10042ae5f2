import type { AttemptRecord, SubscriptionSpec } from '../../core/backbone.ts';
import type { Envelope } from '../../core/envelope.ts';
import { toEnvelope, type LogRow } from '../codec.ts';
import type { Attempts, AttemptsResult } from './attempts.ts';
import type { ConsumerContext } from './context.ts';
import { deadRow, type DeadRow } from './acknowledgement.ts';
import { forEachSlot } from './fair.ts';
import type { Lane } from './lanes.ts';
import { LeaseLost } from './leases.ts';
import { SharedScope } from './scopes.ts';

/**
 * Keys that wait for a retry (the `held` table), as this worker knows them for its lanes: their later
 * messages wait behind them, in `held` too, and nowhere else. Retries the heads whose time has come; a key
 * whose head succeeds (or is given up on) drains in order.
 */
export class HeldKeys {
  /** Keys of this worker's lanes with messages waiting for a retry. */
  readonly #parked = new Set<string>();
  #loaded = false;
  #nextRetryAt = 0;
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #owner: string;
  readonly #attempts: Attempts;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec, owner: string, attempts: Attempts) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#owner = owner;
    this.#attempts = attempts;
  }

  get loaded(): boolean {
    return this.#loaded;
  }

  /** A retry is due now. */
  get due(): boolean {
    return this.#nextRetryAt !== 0 && this.#nextRetryAt <= Date.now();
  }

  /** Milliseconds until the next retry is due, if one is. */
  get untilDue(): number | undefined {
    return this.#nextRetryAt === 0 ? undefined : Math.max(0, this.#nextRetryAt - Date.now());
  }

  isParked(key: string): boolean {
    return this.#parked.has(key);
  }

  /** Held keys changed elsewhere (a redrive) or the lanes changed: learn them again before the next read. */
  invalidate(): void {
    this.#loaded = false;
  }

  /** Keys a batch held, once its acknowledgement committed; `retryAt`: its earliest retry (0: none). */
  parked(keys: Iterable<string>, retryAt: number): void {
    for (const key of keys) this.#parked.add(key);
    if (retryAt !== 0) this.#nextRetryAt = this.#nextRetryAt === 0 ? retryAt : Math.min(this.#nextRetryAt, retryAt);
  }

  async load(partitions: readonly number[]): Promise<void> {
    const { driver, sql } = this.#ctx;
    const { rows } = await driver.query<{ key: string }>(sql.heldKeys, [this.#spec.name, partitions]);
    this.#parked.clear();
    for (const row of rows) this.#parked.add(row.key);
    if (rows.length > 0) this.#nextRetryAt = Date.now();
    this.#loaded = true;
  }

  /**
   * Retries the held keys whose time has come, in one transaction fenced by the lanes' leases, with one
   * statement to take them and one to record what happened: up to `batchSize` keys, each drained in order
   * from its head up to `batchSize` messages (a longer one is due again at once), keys in parallel up to
   * the subscription's concurrency, like a batch's.
   */
  async retryDue(lanes: readonly Lane[]): Promise<void> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const partitions = lanes.map((lane) => lane.partition);
    this.#nextRetryAt = 0;
    const published = new Set<string>();
    const drained = new Set<string>();
    const scope = new SharedScope(driver, published, true, this.#ctx.isolation);
    await scope.run(async () => {
      const tx = scope.connection!;
      const { rows: fence } = await tx.query<{ fenced: number }>(sql.fence, [spec.name, this.#owner, partitions, lanes.map((lane) => lane.epoch)]);
      if (Number(fence[0]?.fenced ?? 0) !== lanes.length) throw new LeaseLost();
      // One more row per key than a pass takes: if it is there, it becomes the key's due head.
      const { rows } = await tx.query<HeldRow>(sql.dueHeld, [spec.name, partitions, spec.batchSize, spec.batchSize + 1]);
      const settled: Settled = { released: [], retried: [], handledIds: [], dead: [] };
      const claimed = new Set<string>();
      const keys = groupByKey(rows);
      await forEachSlot(
        keys,
        spec.concurrency,
        (group) => tenantOf(group[0]!) ?? '',
        spec.tenantShares,
        async (group) => {
          if (await this.#drain(scope, group, settled, claimed)) drained.add(group[0]!.held_key);
        },
      );
      const { released, retried, handledIds, dead } = settled;
      const [, next] = await Promise.all([
        tx.query(sql.settleHeld, [spec.name, released, JSON.stringify(retried), handledIds, JSON.stringify(dead)]),
        tx.query<{ ms: number | string | null }>(sql.nextDue, [spec.name, partitions]),
      ]);
      const ms = next.rows[0]?.ms;
      if (ms !== null && ms !== undefined) this.#nextRetryAt = Date.now() + Math.max(0, Number(ms));
    });
    for (const key of drained) this.#parked.delete(key);
    if (published.size > 0) this.#ctx.committed(published);
  }

  /**
   * Retries one key's head and hands it the messages behind it, in order, until one must wait again (its
   * retry, or its tenant suspended). Records the outcomes in `settled`; returns true if the key drained.
   */
  async #drain(scope: SharedScope, rows: readonly HeldRow[], settled: Settled, claimed: Set<string>): Promise<boolean> {
    const spec = this.#spec;
    for (const [index, row] of rows.entries()) {
      if (index === spec.batchSize) {
        // The pass took its share of this key: the rest waits, its first message due at once.
        settled.retried.push({ seq: row.seq, attempts: null, delay_ms: 0, history: null });
        return false;
      }
      const envelope = row.message ?? (row.position === null ? undefined : toEnvelope(row as LogRow));
      if (this.#ctx.suspended?.has(envelope?.tenant) === true) {
        // Its tenant is suspended: the key waits, due again when the tenant is resumed (ops/tenants.ts).
        settled.retried.push({ seq: row.seq, attempts: null, delay_ms: null, history: null });
        return false;
      }
      let outcome: AttemptsResult;
      if (envelope === undefined) {
        outcome = { kind: 'dead', reason: `message at position ${row.held_position} is no longer in the log`, history: row.history };
      } else if (spec.inbox && (row.seen === true || claimed.has(envelope.id))) {
        // Handled before: a copy published twice, or redriven after it was handled.
        outcome = { kind: 'ack' };
      } else {
        if (spec.inbox) claimed.add(envelope.id);
        outcome = await this.#attempts.run(scope, envelope, row.attempts + 1, [...row.history]);
        if (outcome.kind === 'ack' && spec.inbox) settled.handledIds.push(envelope.id);
      }
      if (outcome.kind === 'retry') {
        if (spec.inbox && envelope !== undefined) claimed.delete(envelope.id);
        settled.retried.push({ seq: row.seq, attempts: outcome.attempt, delay_ms: outcome.delayMs, history: outcome.history });
        return false;
      }
      if (outcome.kind === 'dead') {
        if (spec.inbox && envelope !== undefined) claimed.delete(envelope.id);
        settled.dead.push(deadRow(spec.name, envelope ?? deadEnvelope(row), row.held_position, outcome.reason, outcome.history));
      }
      settled.released.push(row.seq);
    }
    return true;
  }
}

/**
 * A held row as a retry pass takes it (`statements.dueHeld`): its own columns, then its message's columns
 * from the log (`position` null when the log no longer has it).
 */
type HeldRow = Omit<LogRow, 'position'> & {
  seq: number | string;
  held_key: string;
  held_position: number | string | null;
  /** The message itself, kept with a redriven dead letter (its copy in the log may be gone). */
  message: Envelope | null;
  attempts: number;
  history: AttemptRecord[];
  position: number | string | null;
};

/** What a retry pass did, written by `statements.settleHeld`. */
interface Settled {
  readonly released: Array<number | string>;
  /** A retry set (attempts, delay and history), the head of a suspended tenant's key (no delay: it waits), or a new head due now. */
  readonly retried: Array<{ seq: number | string; attempts: number | null; delay_ms: number | null; history: AttemptRecord[] | null }>;
  readonly handledIds: string[];
  readonly dead: DeadRow[];
}

function groupByKey(rows: readonly HeldRow[]): HeldRow[][] {
  const groups = new Map<string, HeldRow[]>();
  for (const row of rows) {
    const group = groups.get(row.held_key);
    if (group === undefined) groups.set(row.held_key, [row]);
    else group.push(row);
  }
  return [...groups.values()];
}

function tenantOf(row: HeldRow): string | undefined {
  return row.message?.tenant ?? row.tenant ?? undefined;
}

/** What a dead letter records when the message itself is gone from the log. */
function deadEnvelope(row: HeldRow): Envelope {
  return {
    specversion: '1.0',
    id: `missing-at-${row.held_position}`,
    source: 'tidings://unknown',
    type: 'unknown',
    time: new Date().toISOString(),
    datacontenttype: 'application/json',
    topic: 'unknown',
    partitionkey: row.held_key,
    correlationid: `missing-at-${row.held_position}`,
    data: null,
  };
}
