import { hostname } from 'node:os';
import type { AttemptRecord, Consumer, DeliveryHandler, SubscriptionSpec } from '../core/backbone.ts';
import type { Envelope } from '../core/envelope.ts';
import { describeError, TidingsError } from '../core/errors.ts';
import type { Queryable, SqlDriver } from './driver.ts';
import type { Notifier } from './notifier.ts';
import type { LogRow, Statements } from './statements.ts';
import { AttemptScope, Gate, type PgTransaction } from './transaction.ts';

export interface ConsumerSettings {
  readonly leaseMs: number;
  readonly heartbeatMs: number;
  /** Backstop poll while LISTEN works: a lost notification costs at most this much latency. */
  readonly pollMs: number;
  /** Poll interval when LISTEN is unavailable. */
  readonly fallbackPollMs: number;
  readonly errorBackoffMaxMs: number;
}

export interface ConsumerContext {
  readonly driver: SqlDriver;
  readonly sql: Statements;
  readonly notifier: Notifier;
  readonly settings: ConsumerSettings;
  readonly warn: (message: string, error?: unknown) => void;
  /** Wakes consumers of topics published inside a consumer's transaction, once it committed. */
  readonly committed: (topics: ReadonlySet<string>) => void;
}

/** Where a partition has read to. See the `cursors` table. */
interface CursorState {
  done: string;
  window: string | null;
  position: number | null;
}

class LeaseLost extends Error {
  override name = 'LeaseLost';
}

/**
 * A subscription's workers in this process. It registers the process as a worker, and on every heartbeat
 * renews its leases and balances partitions with the other live workers: each takes ceil(partitions / workers).
 * A worker killed with -9 stops renewing; its partitions are free once their lease expires.
 */
export class PostgresConsumer implements Consumer {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<PgTransaction>;
  readonly #workerId = `${hostname()}:${process.pid}:${Math.random().toString(36).slice(2, 10)}`;
  readonly #partitions = new Map<number, PartitionWorker>();
  #timer: NodeJS.Timeout | undefined;
  #beating: Promise<void> | undefined;
  #unregister: (() => void) | undefined;
  #stopped = false;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec, handle: DeliveryHandler<PgTransaction>) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#handle = handle;
  }

  get workerId(): string {
    return this.#workerId;
  }

  async start(): Promise<void> {
    const { driver, sql, settings } = this.#ctx;
    const spec = this.#spec;
    await driver.transaction(async (tx) => {
      const { rows } = await tx.query<{ partitions: number }>(sql.upsertSubscription, [spec.name, spec.topics, spec.partitions]);
      const stored = rows[0]?.partitions ?? (await tx.query<{ partitions: number }>(sql.subscriptionPartitions, [spec.name])).rows[0]?.partitions;
      if (stored !== undefined && stored !== spec.partitions) {
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Subscription ${spec.name} exists with ${stored} partitions, not ${spec.partitions}: changing the count would break per-key order. Keep partitions: ${stored}, or use a new subscription name`,
        );
      }
      await tx.query(sql.createCursors, [spec.name, spec.partitions, spec.startFrom === 'beginning']);
      await tx.query(sql.registerWorker, [this.#workerId, spec.name, hostname(), process.pid, settings.leaseMs]);
    });
    const stopWakes = this.#ctx.notifier.register(spec.topics, () => {
      for (const worker of this.#partitions.values()) worker.wake();
    });
    const stopSignals = this.#ctx.notifier.onSignal(`held:${spec.name}`, () => {
      for (const worker of this.#partitions.values()) worker.reloadHeld();
    });
    this.#unregister = () => {
      stopWakes();
      stopSignals();
    };
    await this.#heartbeat();
    this.#timer = setInterval(() => {
      this.#beating ??= this.#heartbeat()
        .catch((error: unknown) => this.#ctx.warn(`Subscription ${spec.name}: heartbeat failed; retrying`, error))
        .finally(() => {
          this.#beating = undefined;
        });
    }, settings.heartbeatMs);
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    clearInterval(this.#timer);
    this.#unregister?.();
    await this.#beating?.catch(() => undefined);
    const workers = [...this.#partitions.values()];
    this.#partitions.clear();
    await Promise.all(workers.map((worker) => worker.stop()));
    const { driver, sql } = this.#ctx;
    try {
      for (const worker of workers) await driver.query(sql.release, [this.#spec.name, worker.partition, this.#workerId]);
      await driver.query(sql.unregisterWorker, [this.#workerId]);
    } catch (error) {
      // The leases expire by themselves; another worker takes over then.
      this.#ctx.warn(`Subscription ${this.#spec.name}: could not release leases on stop; they expire in ${this.#ctx.settings.leaseMs} ms`, error);
    }
  }

  async #heartbeat(): Promise<void> {
    if (this.#stopped) return;
    const { driver, sql, settings } = this.#ctx;
    const spec = this.#spec;
    const { rows } = await driver.query<{ live: number; mine: Array<{ partition: number; epoch: string }> }>(sql.heartbeat, [
      this.#workerId,
      spec.name,
      settings.leaseMs,
    ]);
    const live = Math.max(1, Number(rows[0]?.live ?? 1));
    const mine = new Map((rows[0]?.mine ?? []).map((entry) => [entry.partition, entry.epoch]));
    if (this.#stopped) return;
    if (rows[0] !== undefined && !mine.size && this.#partitions.size === 0) {
      await driver.query(sql.registerWorker, [this.#workerId, spec.name, hostname(), process.pid, settings.leaseMs]);
    }
    // A partition whose lease we no longer hold (expired during a pause, taken over) stops at once;
    // its next acknowledgement would be refused by the epoch fence anyway.
    for (const [partition, worker] of this.#partitions) {
      if (mine.get(partition) !== worker.epoch) {
        this.#partitions.delete(partition);
        void worker.stop();
      }
    }
    const target = Math.ceil(spec.partitions / live);
    if (this.#partitions.size < target) {
      const { rows: acquired } = await driver.query<{
        partition: number;
        epoch: string;
        done: string;
        window_snapshot: string | null;
        window_position: string | number | null;
      }>(sql.acquire, [this.#workerId, spec.name, settings.leaseMs, target - this.#partitions.size]);
      for (const row of acquired) {
        if (this.#stopped) {
          await driver.query(sql.release, [spec.name, row.partition, this.#workerId]);
          continue;
        }
        const worker = new PartitionWorker(this.#ctx, spec, this.#handle, this.#workerId, row.partition, row.epoch, {
          done: row.done,
          window: row.window_snapshot,
          position: row.window_position === null ? null : Number(row.window_position),
        });
        this.#partitions.set(row.partition, worker);
        worker.start();
      }
    } else if (this.#partitions.size > target) {
      const extra = [...this.#partitions.keys()].sort((a, b) => b - a).slice(0, this.#partitions.size - target);
      for (const partition of extra) {
        const worker = this.#partitions.get(partition)!;
        this.#partitions.delete(partition);
        await worker.stop();
        await driver.query(sql.release, [spec.name, partition, this.#workerId]);
      }
    }
    await driver.query(sql.forgetExpiredWorkers, [spec.name]);
  }
}

interface HeldRow {
  key: string;
  position: number | null;
  message: Envelope | null;
  attempts: number;
  next_attempt_at: string | null;
  history: AttemptRecord[];
}

interface DeadRow {
  subscription: string;
  message_id: string;
  topic: string;
  key: string;
  position: number | null;
  envelope: Envelope;
  reason: string;
  attempts: AttemptRecord[];
}

type AttemptsResult =
  | { kind: 'ack' }
  | { kind: 'retry'; delayMs: number; attempt: number; history: AttemptRecord[] }
  | { kind: 'dead'; reason: string; history: AttemptRecord[] };

/**
 * Reads one partition in commit order and hands its messages to the pipeline, one batch per transaction.
 *
 * Commit order without skipping: each read compares two snapshots. `done` is a snapshot whose committed
 * messages are all handled; a read takes the current snapshot `win` and returns the messages of
 * transactions that completed after `done` and by `win`, in position order. A transaction that commits
 * late is simply in a later window, however early its rows were numbered, so the classic outbox bug
 * (a bigserial read as "greater than my offset" skipping late commits) cannot happen; see
 * test/guarantees.pg.test.ts "no skipped messages".
 */
class PartitionWorker {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<PgTransaction>;
  readonly #owner: string;
  readonly partition: number;
  readonly epoch: string;
  #state: CursorState;
  /** Keys with messages waiting for a retry: their later messages wait behind them. */
  readonly #parked = new Set<string>();
  #nextRetryAt = 0;
  #dirty = true;
  #stopping = false;
  #wakeUp: (() => void) | undefined;
  #loop: Promise<void> | undefined;
  #failures = 0;
  #loaded = false;

  constructor(
    ctx: ConsumerContext,
    spec: SubscriptionSpec,
    handle: DeliveryHandler<PgTransaction>,
    owner: string,
    partition: number,
    epoch: string,
    state: CursorState,
  ) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#handle = handle;
    this.#owner = owner;
    this.partition = partition;
    this.epoch = epoch;
    this.#state = state;
  }

  start(): void {
    this.#loop = this.#run();
  }

  wake(): void {
    this.#dirty = true;
    this.#wakeUp?.();
  }

  /** Held messages were added from outside (a redrive): learn the held keys again and retry what is due. */
  reloadHeld(): void {
    this.#loaded = false;
    this.wake();
  }

  async stop(): Promise<void> {
    this.#stopping = true;
    this.#wakeUp?.();
    await this.#loop;
  }

  async #run(): Promise<void> {
    const { driver, sql } = this.#ctx;
    while (!this.#stopping) {
      try {
        if (!this.#loaded) {
          const { rows } = await driver.query<{ key: string }>(sql.heldKeys, [this.#spec.name, this.partition]);
          for (const row of rows) this.#parked.add(row.key);
          if (rows.length > 0) this.#nextRetryAt = Date.now();
          this.#loaded = true;
        }
        let more = false;
        if (this.#nextRetryAt !== 0 && this.#nextRetryAt <= Date.now()) await this.#retryDue();
        if (this.#dirty || this.#state.window !== null) {
          this.#dirty = false;
          more = await this.#readAndHandle();
        }
        this.#failures = 0;
        if (!more) await this.#idle();
      } catch (error) {
        if (error instanceof LeaseLost) {
          this.#ctx.warn(`Subscription ${this.#spec.name}: lost the lease of partition ${this.partition}; another worker has it`);
          return;
        }
        this.#failures++;
        const delay = Math.min(this.#ctx.settings.errorBackoffMaxMs, 100 * 2 ** this.#failures);
        this.#ctx.warn(`Subscription ${this.#spec.name}, partition ${this.partition}: ${(error as Error).message}; retrying in ${delay} ms`, error);
        this.#dirty = true;
        await this.#sleep(delay);
      }
    }
  }

  async #idle(): Promise<void> {
    const { notifier, settings } = this.#ctx;
    let wait = notifier.listening ? settings.pollMs : settings.fallbackPollMs;
    if (this.#nextRetryAt !== 0) wait = Math.min(wait, Math.max(0, this.#nextRetryAt - Date.now()));
    if (this.#dirty || wait <= 0) return;
    await this.#sleep(wait);
    this.#dirty = true;
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.#wakeUp = () => {
        this.#wakeUp = undefined;
        done();
      };
      if (this.#stopping) done();
    });
  }

  /** Reads the next batch of this partition and handles it. Returns true if more is waiting. */
  async #readAndHandle(): Promise<boolean> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const state = this.#state;
    const common = [state.done, spec.topics, spec.partitions, this.partition, spec.batchSize];
    let rows: LogRow[];
    let window: string;
    if (state.window === null) {
      const result = await driver.query<LogRow & { win: string }>(sql.openWindow, common);
      window = result.rows[0]!.win;
      rows = result.rows.filter((row) => row.position !== null);
    } else {
      window = state.window;
      rows = (await driver.query<LogRow>(sql.continueWindow, [...common, state.window, state.position])).rows;
    }
    const full = rows.length === spec.batchSize;
    const next: CursorState = full
      ? { done: state.done, window, position: Number(rows[rows.length - 1]!.position) }
      : { done: window, window: null, position: null };
    if (rows.length === 0) {
      // Nothing to acknowledge: the cursor moves in memory and is written with the next batch.
      this.#state = next;
      return false;
    }
    await this.#handleBatch(rows, next);
    this.#state = next;
    return full;
  }

  async #handleBatch(rows: LogRow[], next: CursorState): Promise<void> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const published = new Set<string>();
    const parkedNow = new Set<string>();
    let earliestRetry = 0;
    await driver.transaction(async (tx) => {
      const gate = new Gate();
      const fresh = spec.inbox ? await this.#claim(tx, rows.map((row) => row.id)) : undefined;
      const held: HeldRow[] = [];
      const dead: DeadRow[] = [];
      const unclaim: string[] = [];
      await forEachLimit(groupByKey(rows), spec.concurrency, async (group) => {
        let holding = this.#parked.has(group[0]!.key);
        for (const row of group) {
          const position = Number(row.position);
          if (holding) {
            held.push({ key: row.key, position, message: null, attempts: 0, next_attempt_at: null, history: [] });
            unclaim.push(row.id);
            continue;
          }
          if (fresh !== undefined && !fresh.has(row.id)) continue; // handled before (redelivery or redrive)
          const envelope = toEnvelope(row);
          const result = await this.#attempts(tx, gate, published, envelope, 1, []);
          if (result.kind === 'ack') continue;
          unclaim.push(row.id);
          if (result.kind === 'dead') {
            dead.push(deadRow(spec.name, envelope, position, result.reason, result.history));
            continue;
          }
          const at = Date.now() + result.delayMs;
          earliestRetry = earliestRetry === 0 ? at : Math.min(earliestRetry, at);
          held.push({
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
      });
      if (held.length > 0) await tx.query(sql.hold, [spec.name, this.partition, JSON.stringify(held)]);
      if (dead.length > 0) await tx.query(sql.deadLetter, [JSON.stringify(dead)]);
      if (unclaim.length > 0 && spec.inbox) await tx.query(sql.inboxForget, [spec.name, unclaim]);
      const { rowCount } = await tx.query(sql.advanceCursor, [
        spec.name,
        this.partition,
        this.#owner,
        next.done,
        next.window,
        next.position,
        rows.length,
        this.epoch,
      ]);
      if (rowCount === 0) throw new LeaseLost();
    });
    for (const key of parkedNow) this.#parked.add(key);
    if (earliestRetry !== 0) this.#nextRetryAt = this.#nextRetryAt === 0 ? earliestRetry : Math.min(this.#nextRetryAt, earliestRetry);
    if (published.size > 0) this.#ctx.committed(published);
  }

  /** Runs one message's attempts: immediate retries in place, until it is acknowledged, delayed or dead. */
  async #attempts(
    tx: Queryable,
    gate: Gate,
    published: Set<string>,
    envelope: Envelope,
    firstAttempt: number,
    history: AttemptRecord[],
  ): Promise<AttemptsResult> {
    for (let attempt = firstAttempt; ; attempt++) {
      const scope = new AttemptScope(tx, gate, published);
      let result = await this.#handle({ envelope, attempt, tx: scope.tx }).catch((error: unknown) => ({
        outcome: 'retry' as const,
        delayMs: 0,
        error: describeError(error),
      }));
      const lost = await scope.end(result.outcome === 'ack');
      if (lost !== undefined) {
        result = {
          outcome: 'retry',
          delayMs: 0,
          error: describeError(new Error(`the handler returned, but a statement in its transaction failed, so its writes were rolled back: ${lost.message}`, { cause: lost })),
        };
      }
      if (result.outcome === 'ack') return { kind: 'ack' };
      history.push({ attempt, at: new Date().toISOString(), error: result.error });
      if (result.outcome === 'dead-letter') return { kind: 'dead', reason: result.reason, history };
      if (result.delayMs > 0 || this.#stopping) return { kind: 'retry', delayMs: result.delayMs, attempt, history };
    }
  }

  async #claim(tx: Queryable, ids: string[]): Promise<Set<string>> {
    const { rows } = await tx.query<{ message_id: string }>(this.#ctx.sql.inboxClaim, [this.#spec.name, ids]);
    return new Set(rows.map((row) => row.message_id));
  }

  /** Retries the heads of held keys whose time has come; a key whose head succeeds drains in order. */
  async #retryDue(): Promise<void> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    this.#nextRetryAt = 0;
    const published = new Set<string>();
    const drained = new Set<string>();
    await driver.transaction(async (tx) => {
      const { rows: heads } = await tx.query<HeldHead>(sql.dueHeads, [spec.name, this.partition, spec.batchSize]);
      const gate = new Gate();
      for (const first of heads) {
        let head: HeldHead | undefined = first;
        while (head !== undefined) {
          const envelope = head.message ?? (await this.#fromLog(tx, head.position));
          let outcome: AttemptsResult;
          if (envelope === undefined) {
            outcome = { kind: 'dead', reason: `message at position ${head.position} is no longer in the log`, history: head.history };
          } else if (spec.inbox && (await this.#claim(tx, [envelope.id])).size === 0) {
            outcome = { kind: 'ack' };
          } else {
            outcome = await this.#attempts(tx, gate, published, envelope, head.attempts + 1, [...head.history]);
          }
          if (outcome.kind === 'retry') {
            await tx.query(sql.rescheduleHeld, [head.seq, outcome.attempt, outcome.delayMs, JSON.stringify(outcome.history)]);
            if (spec.inbox && envelope !== undefined) await tx.query(sql.inboxForget, [spec.name, [envelope.id]]);
            break;
          }
          if (outcome.kind === 'dead' && envelope !== undefined) {
            await tx.query(sql.deadLetter, [JSON.stringify([deadRow(spec.name, envelope, head.position, outcome.reason, outcome.history)])]);
            if (spec.inbox) await tx.query(sql.inboxForget, [spec.name, [envelope.id]]);
          }
          await tx.query(sql.releaseHeld, [head.seq]);
          head = (await tx.query<HeldHead>(sql.nextHeld, [spec.name, first.key])).rows[0];
        }
        if (head === undefined) drained.add(first.key);
      }
      const { rows } = await tx.query<{ ms: number | string | null }>(sql.nextDue, [spec.name, this.partition]);
      const ms = rows[0]?.ms;
      if (ms !== null && ms !== undefined) this.#nextRetryAt = Date.now() + Math.max(0, Number(ms));
      await this.#checkLease(tx);
    });
    for (const key of drained) this.#parked.delete(key);
    if (published.size > 0) this.#ctx.committed(published);
  }

  async #checkLease(tx: Queryable): Promise<void> {
    const { rowCount } = await tx.query(this.#ctx.sql.advanceCursor, [
      this.#spec.name,
      this.partition,
      this.#owner,
      this.#state.done,
      this.#state.window,
      this.#state.position,
      0,
      this.epoch,
    ]);
    if (rowCount === 0) throw new LeaseLost();
  }

  async #fromLog(tx: Queryable, position: number | string | null): Promise<Envelope | undefined> {
    if (position === null) return undefined;
    const { rows } = await tx.query<LogRow>(this.#ctx.sql.messagesAt, [[position]]);
    return rows[0] === undefined ? undefined : toEnvelope(rows[0]);
  }
}

interface HeldHead {
  seq: number | string;
  key: string;
  position: number | string | null;
  message: Envelope | null;
  attempts: number;
  history: AttemptRecord[];
}

function deadRow(subscription: string, envelope: Envelope, position: number | string | null, reason: string, attempts: AttemptRecord[]): DeadRow {
  return {
    subscription,
    message_id: envelope.id,
    topic: envelope.topic,
    key: envelope.partitionkey,
    position: position === null ? null : Number(position),
    envelope,
    reason,
    attempts,
  };
}

export function toEnvelope(row: LogRow): Envelope {
  return {
    specversion: '1.0',
    id: row.id,
    source: row.source,
    type: row.type,
    time: row.time instanceof Date ? row.time.toISOString() : String(row.time),
    subject: row.subject ?? undefined,
    datacontenttype: 'application/json',
    topic: row.topic,
    partitionkey: row.key,
    tenant: row.tenant ?? undefined,
    correlationid: row.correlation_id,
    causationid: row.causation_id ?? undefined,
    traceparent: row.traceparent ?? undefined,
    tracestate: row.tracestate ?? undefined,
    data: row.data,
  };
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

async function forEachLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const errors: unknown[] = [];
  const lane = async () => {
    while (next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item);
      } catch (error) {
        errors.push(error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  if (errors.length > 0) throw errors[0];
}
