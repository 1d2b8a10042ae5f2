import type { AttemptRecord, SubscriptionSpec } from '../../core/backbone.ts';
import type { Envelope } from '../../core/envelope.ts';
import type { Queryable } from '../connection/driver.ts';
import { toEnvelope, type LogRow } from '../codec.ts';
import type { Attempts, AttemptsResult } from './attempts.ts';
import type { ConsumerContext } from './context.ts';
import { deadRow } from './acknowledgement.ts';
import type { Lane } from './lanes.ts';
import { LeaseLost } from './leases.ts';
import { SharedScope } from './scopes.ts';

/** A held key's first row: the message that waits for its retry, with its attempts so far. */
interface HeldHead {
  seq: number | string;
  partition: number;
  key: string;
  position: number | string | null;
  message: Envelope | null;
  attempts: number;
  history: AttemptRecord[];
}

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

  /** Retries the heads of held keys whose time has come, in one transaction fenced by the lanes' leases. */
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
      const { rows: heads } = await tx.query<HeldHead>(sql.dueHeads, [spec.name, partitions, spec.batchSize]);
      for (const first of heads) {
        let head: HeldHead | undefined = first;
        while (head !== undefined) {
          const envelope = head.message ?? (await this.#fromLog(tx, head.position));
          if (this.#ctx.suspended?.has(envelope?.tenant) === true) {
            // Its tenant is suspended: the key waits, due again when the tenant is resumed (ops/tenants.ts).
            await tx.query(sql.waitHeld, [head.seq]);
            break;
          }
          let outcome: AttemptsResult;
          if (envelope === undefined) {
            outcome = { kind: 'dead', reason: `message at position ${head.position} is no longer in the log`, history: head.history };
          } else if (spec.inbox && (await tx.query(sql.inboxClaim, [spec.name, envelope.id])).rows.length === 0) {
            outcome = { kind: 'ack' };
          } else {
            outcome = await this.#attempts.run(scope, envelope, head.attempts + 1, [...head.history]);
          }
          if (outcome.kind === 'retry') {
            await tx.query(sql.rescheduleHeld, [head.seq, outcome.attempt, outcome.delayMs, JSON.stringify(outcome.history)]);
            if (spec.inbox && envelope !== undefined) await tx.query(sql.inboxForget, [spec.name, [envelope.id]]);
            break;
          }
          if (outcome.kind === 'dead') {
            const copy = envelope ?? deadEnvelope(head);
            await tx.query(sql.deadLetter, [JSON.stringify([deadRow(spec.name, copy, head.position, outcome.reason, outcome.history)])]);
            if (spec.inbox && envelope !== undefined) await tx.query(sql.inboxForget, [spec.name, [envelope.id]]);
          }
          await tx.query(sql.releaseHeld, [head.seq]);
          head = (await tx.query<HeldHead>(sql.nextHeld, [spec.name, first.key])).rows[0];
        }
        if (head === undefined) drained.add(first.key);
      }
      const { rows } = await tx.query<{ ms: number | string | null }>(sql.nextDue, [spec.name, partitions]);
      const ms = rows[0]?.ms;
      if (ms !== null && ms !== undefined) this.#nextRetryAt = Date.now() + Math.max(0, Number(ms));
    });
    for (const key of drained) this.#parked.delete(key);
    if (published.size > 0) this.#ctx.committed(published);
  }

  async #fromLog(tx: Queryable, position: number | string | null): Promise<Envelope | undefined> {
    if (position === null) return undefined;
    const { rows } = await tx.query<LogRow>(this.#ctx.sql.messagesAt, [[position]]);
    return rows[0] === undefined ? undefined : toEnvelope(rows[0]);
  }
}

/** What a dead letter records when the message itself is gone from the log. */
function deadEnvelope(head: HeldHead): Envelope {
  return {
    specversion: '1.0',
    id: `missing-at-${head.position}`,
    source: 'tidings://unknown',
    type: 'unknown',
    time: new Date().toISOString(),
    datacontenttype: 'application/json',
    topic: 'unknown',
    partitionkey: head.key,
    correlationid: `missing-at-${head.position}`,
    data: null,
  };
}
