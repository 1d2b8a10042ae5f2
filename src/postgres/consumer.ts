import { hostname } from 'node:os';
import { EVERY_TOPIC, type AttemptRecord, type Consumer, type Delivery, type DeliveryHandler, type DeliveryResult, type SubscriptionSpec } from '../core/backbone.ts';
import type { Envelope } from '../core/envelope.ts';
import { describeError, TidingsError } from '../core/errors.ts';
import { preparing, runStatement, type Queryable, type SqlDriver, type Statement } from './driver.ts';
import type { Notifier } from './notifier.ts';
import type { LogRow, Statements } from './statements.ts';
import { Gate, SharedScope, type Attempt, type PgTransaction } from './transaction.ts';

export interface ConsumerSettings {
  readonly leaseMs: number;
  readonly heartbeatMs: number;
  /** Backstop poll while LISTEN works: a lost notification costs at most this much latency. */
  readonly pollMs: number;
  /** Poll interval when LISTEN is unavailable. */
  readonly fallbackPollMs: number;
  readonly errorBackoffMaxMs: number;
  /**
   * Transactions (so connections) a batch whose handlers write through `ctx.tx` is split into, by partition;
   * 1 keeps one. Forced to 1 on a driver with one session (PGlite).
   */
  readonly handlerConnections: number;
}

export interface ConsumerContext {
  readonly driver: SqlDriver;
  readonly sql: Statements;
  readonly notifier: Notifier;
  readonly settings: ConsumerSettings;
  readonly warn: (message: string, error?: unknown) => void;
  /** Wakes consumers of topics published inside a consumer's transaction, once it committed. */
  readonly committed: (topics: ReadonlySet<string>) => void;
  /** This process's workers on the backbone: a consumer is in it while registered in `workers`. */
  readonly workers: Set<string>;
}

/**
 * Where a lane (a partition this worker holds) has read to; see the `cursors` table.
 *
 * Commit order without skipping: `done` is a snapshot whose committed messages are all handled. A read
 * takes the current snapshot `window` and returns the messages of transactions that completed after `done`
 * and by `window`, in position order; when the window is exhausted it becomes the new `done`. A transaction
 * that commits late is simply in a later window, however early its rows were numbered, so the classic
 * outbox bug (a bigserial read as "greater than my offset" skips late commits) cannot happen; see
 * test/guarantees.pg.test.ts, "no skipped messages".
 */
interface Lane {
  readonly partition: number;
  readonly epoch: string;
  done: string;
  window: string | null;
  position: number | null;
  /** No message of the open window has a higher position (null after a restart: the log's last is used). */
  hi: number | null;
  /** Positions scanned by the next read of the open window; grows while reads come back sparse. */
  span: number;
}

type LaneCursor = Pick<Lane, 'done' | 'window' | 'position' | 'hi' | 'span'>;

/** A window's first range spans `batchSize` x this many positions; sparse ranges double it, up to the maximum. */
const MIN_SPAN_BATCHES = 1;
const MAX_SPAN = 1_000_000;
/**
 * Fewest messages per sub-batch: each costs its own begin, acknowledgement and commit (and a pool
 * connection publishers may be waiting for), worth it only when it spares many statements in line.
 */
const MIN_SUB_BATCH = 32;

/** SQLSTATE the acknowledgement raises when a lease was lost (migration 004). */
const LEASE_LOST = 'TDL01';
/** SQLSTATE the acknowledgement raises when the subscription gained a topic this worker cannot handle (migration 005). */
const TOPICS_CHANGED = 'TDL02';
const UNIQUE_VIOLATION = '23505';

class LeaseLost extends Error {
  override name = 'LeaseLost';
}

class TopicsChanged extends Error {
  override name = 'TopicsChanged';
}

/** A live worker of the subscription, as the heartbeat reads it; `topics` null for a worker of an older version. */
interface WorkerTopics {
  readonly id: string;
  readonly topics: readonly string[] | null;
}

/** A message that must wait behind its key, or for its own retry; written to `held` with the acknowledgement. */
interface HeldRow {
  partition: number;
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

/** The batch's transaction was abandoned: a handler that wrote through it failed. Replay the batch with savepoints. */
class ReplayCarefully extends Error {}

/**
 * One subscription's worker in this process. It holds leases on some of the subscription's partitions
 * (its lanes) and reads all of them with one statement, handles the messages with up to `concurrency`
 * keys in flight, and acknowledges the whole batch with one more. On every heartbeat it renews its
 * leases and balances partitions with the other live workers: each takes ceil(partitions / workers).
 * A worker killed with -9 stops renewing; its partitions are free once their lease expires.
 */
export class PostgresConsumer implements Consumer {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<PgTransaction>;
  readonly #owner = `${hostname()}:${process.pid}:${Math.random().toString(36).slice(2, 10)}`;
  readonly #lanes = new Map<number, Lane>();
  /** Held while a batch runs, so lanes change only between batches. */
  readonly #batchGate = new Gate();
  /** Keys with messages waiting for a retry: their later messages wait behind them. */
  readonly #parked = new Set<string>();
  #heldLoaded = false;
  #nextRetryAt = 0;
  #dirty = true;
  #stopping = false;
  #wakeUp: (() => void) | undefined;
  #loop: Promise<void> | undefined;
  #failures = 0;
  /** When workers expired long ago were last forgotten (see #rebalance). */
  #forgotAt = 0;
  /** The log's last position when last read: how large the log has grown (see #read). */
  #logEnd = 0;
  /** The next batch's read, sent while the current batch was handled (see #readAndHandle). */
  #ahead: ReadAhead | undefined;
  /** The last batch's handlers wrote through `ctx.tx`: the next batch is split into sub-batches (see #split). */
  #wrote = false;
  /** The last batch's acknowledgement, still in flight while the next batch is handled (see #readAndHandle). */
  #acking: Acking | undefined;
  #timer: NodeJS.Timeout | undefined;
  #beating: Promise<void> | undefined;
  #rebalancing: Promise<void> | undefined;
  #unregister: (() => void) | undefined;
  /** The last disagreement on topics this worker warned about (see #agree), so it warns once per change. */
  #disagreement = '';

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec, handle: DeliveryHandler<PgTransaction>) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#handle = handle;
  }

  async start(): Promise<void> {
    const { driver, sql, settings, notifier } = this.#ctx;
    const spec = this.#spec;
    this.#ctx.workers.add(this.#owner);
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
      await tx.query(sql.registerWorker, [this.#owner, spec.name, hostname(), process.pid, settings.leaseMs, spec.topics]);
      // From its commit, an acknowledgement of a worker without one of these topics fails (TDL02).
      await tx.query(sql.settleTopics, [spec.name]);
    });
    const stopWakes = notifier.register(spec.topics, () => this.#wake());
    const stopSignals = notifier.onSignal(`held:${spec.name}`, () => {
      // Held messages were added from outside (a redrive): learn the held keys again, retry what is due.
      this.#heldLoaded = false;
      this.#wake();
    });
    this.#unregister = () => {
      stopWakes();
      stopSignals();
    };
    await this.#heartbeat();
    this.#loop = this.#run();
    this.#timer = setInterval(() => {
      this.#beating ??= this.#heartbeat()
        .catch((error: unknown) => this.#ctx.warn(`Subscription ${spec.name}: heartbeat failed; retrying`, error))
        .finally(() => {
          this.#beating = undefined;
        });
    }, settings.heartbeatMs);
  }

  async stop(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    clearInterval(this.#timer);
    this.#unregister?.();
    this.#wakeUp?.();
    await this.#loop;
    await this.#acking?.done.catch(() => undefined);
    await this.#ahead?.rows.catch(() => undefined);
    this.#ahead = undefined;
    await this.#beating?.catch(() => undefined);
    await this.#rebalancing;
    const { driver, sql } = this.#ctx;
    try {
      for (const partition of this.#lanes.keys()) await driver.query(sql.release, [this.#spec.name, partition, this.#owner]);
      this.#lanes.clear();
      await driver.query(sql.unregisterWorker, [this.#owner]);
      // A topic only this worker handled is no longer the subscription's, unless the newest worker has it.
      await driver.query(sql.settleTopics, [this.#spec.name]);
      this.#ctx.workers.delete(this.#owner);
    } catch (error) {
      // The leases expire by themselves; another worker takes over then.
      this.#ctx.warn(`Subscription ${this.#spec.name}: could not release leases on stop; they expire in ${this.#ctx.settings.leaseMs} ms`, error);
    }
  }

  #wake(): void {
    this.#dirty = true;
    this.#wakeUp?.();
  }

  // ---- leases ------------------------------------------------------------------------------------

  /**
   * Renews this worker and its leases, then rebalances. Renewal never waits for a batch, so a long batch
   * keeps its leases; rebalancing changes lanes only between batches, and runs in the background so the
   * next renewal is not held up by it.
   */
  async #heartbeat(): Promise<void> {
    if (this.#stopping) return;
    const { driver, sql, settings } = this.#ctx;
    const { rows } = await driver.query<{ workers: WorkerTopics[]; topics: string[] | null; mine: Array<{ partition: number; epoch: string }> }>(sql.heartbeat, [
      this.#owner,
      this.#spec.name,
      settings.leaseMs,
    ]);
    const live = this.#agree(rows[0]?.topics ?? [], rows[0]?.workers ?? []);
    const mine = new Map((rows[0]?.mine ?? []).map((entry) => [entry.partition, String(entry.epoch)]));
    this.#rebalancing ??= this.#rebalance(live, mine)
      .catch((error: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: rebalancing failed; retrying`, error))
      .finally(() => {
        this.#rebalancing = undefined;
      });
    if (this.#lanes.size === 0) await this.#rebalancing;
  }

  /**
   * How many live workers may hold partitions: those that handle every topic of the subscription (0 if this
   * worker does not; then it holds none). A worker without a handler for one of the subscription's topics
   * would skip its messages: during a rolling deploy that adds a handler, the old workers hand their
   * partitions to the new ones; one that removes a handler waits for the old ones to stop. Warns, once per
   * change, naming the topics and the workers that disagree; see test/conformance/deploy.ts.
   */
  #agree(topics: readonly string[], workers: readonly WorkerTopics[]): number {
    const handles = (own: readonly string[] | null) => own === null || own.includes(EVERY_TOPIC) || topics.every((topic) => own.includes(topic));
    const able = workers.filter((worker) => handles(worker.topics));
    const me = handles(this.#spec.topics);
    const unable = workers.filter((worker) => !handles(worker.topics));
    const disagreement = unable.length === 0 ? '' : JSON.stringify([topics, unable.map((worker) => worker.id), me]);
    if (disagreement !== this.#disagreement) {
      this.#disagreement = disagreement;
      if (disagreement !== '') this.#ctx.warn(describeDisagreement(this.#spec.name, this.#owner, topics, unable, able));
      else this.#ctx.warn(`Subscription ${this.#spec.name}: its workers agree on its topics again (${topics.join(', ')})`);
    }
    return me ? Math.max(1, able.length) : 0;
  }

  async #rebalance(live: number, mine: ReadonlyMap<number, string>): Promise<void> {
    const { driver, sql, settings } = this.#ctx;
    const spec = this.#spec;
    const release = await this.#batchGate.acquire();
    try {
      if (this.#stopping) return;
      // Lanes change only once the last acknowledgement has settled (a failed one is dealt with by the loop).
      await this.#acking?.done.catch(() => undefined);
      // A lane whose lease we no longer hold (expired during a pause, taken over) is dropped at once; a
      // batch still running for it is refused by the epoch fence when it acknowledges.
      for (const [partition, lane] of this.#lanes) {
        if (mine.get(partition) !== lane.epoch) this.#dropLane(partition);
      }
      const target = live === 0 ? 0 : Math.ceil(spec.partitions / live);
      if (this.#lanes.size < target) {
        const { rows: acquired } = await driver.query<{
          partition: number;
          epoch: string;
          done: string;
          window_snapshot: string | null;
          window_position: string | number | null;
        }>(sql.acquire, [this.#owner, spec.name, settings.leaseMs, target - this.#lanes.size]);
        for (const row of acquired) {
          this.#lanes.set(row.partition, {
            partition: row.partition,
            epoch: String(row.epoch),
            done: row.done,
            window: row.window_snapshot,
            position: row.window_position === null ? null : Number(row.window_position),
            hi: null,
            span: this.#spec.batchSize * MIN_SPAN_BATCHES,
          });
        }
        if (acquired.length > 0) {
          this.#heldLoaded = false;
          this.#wake();
        }
      } else if (this.#lanes.size > target) {
        await this.#release([...this.#lanes.keys()].sort((a, b) => b - a).slice(0, this.#lanes.size - target));
      }
      // Workers gone for an hour are forgotten; once a minute is often enough (every heartbeat was a third
      // of an idle consumer's queries).
      if (Date.now() - this.#forgotAt > 60_000) {
        await driver.query(sql.forgetExpiredWorkers, [spec.name]);
        this.#forgotAt = Date.now();
      }
    } finally {
      release();
    }
  }

  #dropLane(partition: number): void {
    this.#lanes.delete(partition);
    this.#heldLoaded = false;
  }

  /** Gives partitions back at once, so another worker takes them without waiting for the leases to expire. */
  async #release(partitions: readonly number[]): Promise<void> {
    for (const partition of partitions) {
      this.#dropLane(partition);
      await this.#ctx.driver.query(this.#ctx.sql.release, [this.#spec.name, partition, this.#owner]);
    }
  }

  // ---- the loop ----------------------------------------------------------------------------------

  async #run(): Promise<void> {
    while (!this.#stopping) {
      let more = false;
      const release = await this.#batchGate.acquire();
      try {
        if (this.#lanes.size > 0) {
          const retrying = this.#nextRetryAt !== 0 && this.#nextRetryAt <= Date.now();
          if (!this.#heldLoaded || retrying) await this.#settled();
          if (!this.#heldLoaded) await this.#loadHeld();
          if (retrying) await this.#retryDue();
          const lanes = [...this.#lanes.values()];
          if (this.#dirty || lanes.some((lane) => lane.window !== null)) {
            // Only a read that opens a window for every lane sees what was committed up to now. One that
            // goes on with an open window does not: a wake-up that came meanwhile waits for the next window,
            // or the last commits of a burst would wait for the backstop poll.
            if (lanes.every((lane) => lane.window === null)) this.#dirty = false;
            more = await this.#readAndHandle();
          }
        }
        // Idle only once the last acknowledgement has committed: if it failed, its batch is read again now.
        if (!more) await this.#settled();
        this.#failures = 0;
      } catch (error) {
        this.#dirty = true;
        this.#ahead = undefined;
        await this.#settled().catch(() => undefined);
        if (error instanceof LeaseLost) {
          this.#ctx.warn(`Subscription ${this.#spec.name}: a partition's lease was lost during a batch; the batch is left to its new owner`);
          continue;
        }
        if (error instanceof TopicsChanged) {
          // The next heartbeat says who may hold them; till then, hold none (reading on would handle in vain).
          this.#ctx.warn(`Subscription ${this.#spec.name}: it gained a topic this worker has no handler for; its batch is left to workers that have one`);
          await this.#release([...this.#lanes.keys()]).catch((failure: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: could not release partitions`, failure));
          continue;
        }
        this.#failures++;
        const delay = Math.min(this.#ctx.settings.errorBackoffMaxMs, 100 * 2 ** this.#failures);
        this.#ctx.warn(`Subscription ${this.#spec.name}: ${(error as Error).message}; retrying in ${delay} ms`, error);
        release();
        await this.#sleep(delay);
        continue;
      } finally {
        release();
      }
      if (!more) await this.#idle();
    }
  }

  /**
   * Waits for the in-flight acknowledgement. If it failed, the lanes go back to where they were before its
   * batch, whose messages are read again (no later acknowledgement was sent: each waits for the one before),
   * and the failure is thrown.
   */
  async #settled(): Promise<void> {
    const acking = this.#acking;
    if (acking === undefined) return;
    this.#acking = undefined;
    try {
      await acking.done;
    } catch (error) {
      for (const [lane, cursor] of acking.before) if (this.#lanes.get(lane.partition) === lane) Object.assign(lane, cursor);
      this.#ahead = undefined;
      this.#dirty = true;
      throw error;
    }
  }

  async #idle(): Promise<void> {
    const { notifier, settings } = this.#ctx;
    // Without lanes there is nothing to read: wait for the heartbeat to acquire some (it wakes us).
    if (this.#lanes.size === 0) this.#dirty = false;
    let wait = notifier.listening ? settings.pollMs : settings.fallbackPollMs;
    if (this.#nextRetryAt !== 0 && this.#lanes.size > 0) wait = Math.min(wait, Math.max(0, this.#nextRetryAt - Date.now()));
    // Always through a timer, never a bare promise chain, so timers and I/O get their turn.
    if (this.#dirty || wait <= 0) wait = 0;
    const woken = this.#dirty;
    await this.#sleep(wait);
    if (!woken) this.#dirty = true;
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      // A zero wait yields through setImmediate: I/O gets its turn, without a timer's 1 ms minimum.
      const timer = ms > 0 ? setTimeout(done, ms) : setImmediate(done);
      function done() {
        if (ms > 0) clearTimeout(timer as NodeJS.Timeout);
        else clearImmediate(timer as NodeJS.Immediate);
        resolve();
      }
      this.#wakeUp = () => {
        this.#wakeUp = undefined;
        done();
      };
      if (this.#stopping) done();
    });
  }

  async #loadHeld(): Promise<void> {
    const { driver, sql } = this.#ctx;
    const { rows } = await driver.query<{ key: string }>(sql.heldKeys, [this.#spec.name, [...this.#lanes.keys()]]);
    this.#parked.clear();
    for (const row of rows) this.#parked.add(row.key);
    if (rows.length > 0) this.#nextRetryAt = Date.now();
    this.#heldLoaded = true;
  }

  /**
   * Reads the next batch of every lane and handles it. Returns true if more is waiting.
   *
   * While a window stays open, the read of the next batch is sent as soon as this one's rows are in, so the
   * server scans it while this batch is handled and acknowledged (see #readAhead).
   */
  async #readAndHandle(): Promise<boolean> {
    const spec = this.#spec;
    const lanes = [...this.#lanes.values()];
    // Lanes at the same cursor read as one group, with one scan; after a read that finds them caught up,
    // lanes read in the same statement share their new `done`, so groups merge by themselves.
    const grouped = groupLanes(lanes);
    const ahead = this.#ahead;
    this.#ahead = undefined;
    const previous = this.#acking;
    const rows = await (ahead !== undefined && ahead.cursors === cursorsKey(grouped) ? ahead.rows : this.#read(grouped));
    const perGroup = new Map<number, { rows: LogRow[]; window: string; hi: number; rangeEnd: number | null }>();
    for (const row of rows) {
      const index = Number(row.lane_group) - 1;
      let entry = perGroup.get(index);
      if (entry === undefined) {
        entry = { rows: [], window: row.win, hi: Number(row.hi), rangeEnd: row.range_end === null ? null : Number(row.range_end) };
        perGroup.set(index, entry);
      }
      if (row.position !== null) entry.rows.push(row);
    }
    let more = false;
    const next = new Map<number, LaneCursor>();
    const batch: LogRow[] = [];
    const partitionOf = new Map<LogRow, number>();
    /** Lanes of groups that returned rows: all of them are acknowledged, so a group stays in step in the database too. */
    const withRows: Lane[] = [];
    const minSpan = spec.batchSize * MIN_SPAN_BATCHES;
    for (const [index, group] of grouped.entries()) {
      const entry = perGroup.get(index);
      if (entry === undefined) continue;
      const first = group[0]!;
      const full = entry.rows.length === spec.batchSize;
      let moved: LaneCursor;
      if (full) {
        // More may wait right after the last row.
        moved = { done: first.done, window: entry.window, position: Number(entry.rows[entry.rows.length - 1]!.position), hi: entry.hi, span: first.span };
      } else if (entry.rangeEnd !== null && entry.rangeEnd < entry.hi) {
        // The range was sparse: scan on from its end, a wider range next time.
        moved = { done: first.done, window: entry.window, position: entry.rangeEnd, hi: entry.hi, span: Math.min(MAX_SPAN, first.span * 2) };
      } else {
        moved = { done: entry.window, window: null, position: null, hi: null, span: minSpan };
      }
      more ||= moved.window !== null;
      for (const lane of group) next.set(lane.partition, moved);
      if (entry.rows.length > 0) withRows.push(...group);
      for (const row of entry.rows) {
        batch.push(row);
        partitionOf.set(row, Number((row as ReadRow).partition));
      }
    }
    const readAhead = more && !this.#ctx.driver.embedded && !this.#stopping ? this.#readAhead(lanes, next, previous) : undefined;
    /** Lanes whose sub-batch failed: they stay where they were and read the same messages again. */
    const failed = new Set<number>();
    let failure: unknown;
    if (batch.length > 0) {
      const counts = new Map<number, number>();
      for (const partition of partitionOf.values()) counts.set(partition, (counts.get(partition) ?? 0) + 1);
      const parts = this.#split(batch, partitionOf, withRows, counts);
      // With another batch read ahead, a batch in one part whose handlers only acknowledge need not wait
      // for its acknowledgement: it commits while the next batch is handled (see #handleBatch).
      const overlap = readAhead !== undefined && parts.length === 1;
      const before = overlap ? lanes.map((lane): [Lane, LaneCursor] => [lane, { done: lane.done, window: lane.window, position: lane.position, hi: lane.hi, span: lane.span }]) : [];
      const handledBefore = ahead?.handledBefore ?? new Set<string>();
      const outcomes = await Promise.allSettled(
        parts.map(async (part) => {
          const run = (careful: boolean) =>
            this.#handleBatch(part.rows, partitionOf, part.lanes, next, counts, careful, part.concurrency, handledBefore, previous, overlap && !careful);
          try {
            return await run(false);
          } catch (error) {
            if (!(error instanceof ReplayCarefully)) throw error;
            return await run(true);
          }
        }),
      );
      let wrote = false;
      let acking: Acking | undefined;
      for (const [index, outcome] of outcomes.entries()) {
        if (outcome.status === 'fulfilled') {
          wrote ||= outcome.value.wrote;
          if (readAhead !== undefined) for (const id of outcome.value.handled) readAhead.handledBefore.add(id);
          if (outcome.value.acking !== undefined) acking = { done: outcome.value.acking, before, handled: new Set(outcome.value.handled) };
          continue;
        }
        for (const lane of parts[index]!.lanes) failed.add(lane.partition);
        // A lost lease is only a warning: report a real error first, so the loop backs off.
        if (failure === undefined || failure instanceof LeaseLost) failure = outcome.reason;
      }
      this.#wrote = wrote || failure !== undefined;
      // Every part waited for the previous acknowledgement before sending its own: if none failed, it committed.
      if (failure === undefined) this.#acking = acking;
    }
    // Lanes with nothing to acknowledge move on in memory; their cursor is written with a later batch. The
    // lanes of sub-batches that committed move on even if another sub-batch failed: their acknowledgement
    // is in the database, and reading their messages again would handle them twice.
    for (const lane of lanes) {
      const moved = next.get(lane.partition);
      if (moved !== undefined && !failed.has(lane.partition) && this.#lanes.get(lane.partition) === lane) Object.assign(lane, moved);
    }
    if (failure !== undefined) throw failure;
    this.#ahead = readAhead;
    return more;
  }

  /** One statement reading the next messages of every group of lanes. */
  async #read(grouped: Lane[][]): Promise<ReadRow[]> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const params: unknown[] = [
      grouped.map((group) => `{${group.map((lane) => lane.partition).join(',')}}`),
      grouped.map((group) => group[0]!.done),
      grouped.map((group) => group[0]!.window),
      grouped.map((group) => group[0]!.position),
      spec.topics,
      spec.partitions,
      spec.batchSize,
      grouped.map((group) => group[0]!.hi),
      grouped.map((group) => group[0]!.span),
    ];
    if (spec.inbox) params.push(spec.name);
    const everyTopic = spec.topics.includes(EVERY_TOPIC);
    // A prepared statement keeps the plan it was given while the log was small (a sequential scan, which
    // costs milliseconds once the log holds thousands): a new name each time the log grows fourfold plans it again.
    const scale = Math.floor(Math.log2(this.#logEnd + 1) / 2);
    const name = `tidings.${sql.schema}.read.${spec.inbox}.${everyTopic}.${scale}`;
    const { rows } = await driver.prepared<ReadRow>(name, sql.readLanes(spec.inbox, everyTopic), params);
    const hi = Number(rows[0]?.hi ?? 0);
    if (hi > this.#logEnd) this.#logEnd = hi;
    return rows;
  }

  /**
   * Sends the read of the batch after this one, from the cursors this one moves the lanes to. It is used only
   * if the lanes are there when the next batch starts (nothing failed, no lane came or went); otherwise it is
   * dropped and read again. Its `seen` flags were taken before this batch's inbox rows committed, so the
   * ids this batch handles are passed on, and count as seen too.
   */
  #readAhead(lanes: readonly Lane[], next: ReadonlyMap<number, LaneCursor>, acking: Acking | undefined): ReadAhead {
    const grouped = groupLanes(lanes.map((lane) => ({ ...lane, ...next.get(lane.partition) })));
    const rows = this.#read(grouped);
    rows.catch(() => undefined); // a read that fails is read again, or reports when it is used
    // Nor may it see the inbox rows of an acknowledgement still in flight.
    return { cursors: cursorsKey(grouped), rows, handledBefore: new Set(acking?.handled) };
  }

  /**
   * Splits a batch by partition into sub-batches, each handled in its own transaction on its own connection
   * and acknowledged (fenced) for its own lanes. Handlers that write through `ctx.tx` share their
   * sub-batch's connection, one statement at a time, so more connections let more of them write at once.
   * A key lives in one partition, so its messages stay in one sub-batch, in order. Split only when the
   * last batch's handlers wrote: handlers that never write keep one acknowledgement per batch.
   *
   * `concurrency` is shared, not multiplied: each sub-batch gets a fixed part of it, by its number of keys.
   * A fixed part, not a common pool: a sub-batch waiting for a connection from a busy pool must not hold
   * slots that the sub-batches already holding connections need to finish and give theirs back.
   */
  #split(batch: LogRow[], partitionOf: Map<LogRow, number>, lanes: Lane[], counts: Map<number, number>): Array<{ rows: LogRow[]; lanes: Lane[]; concurrency: number }> {
    const spec = this.#spec;
    const withRows = lanes.filter((lane) => (counts.get(lane.partition) ?? 0) > 0);
    const n = this.#wrote ? Math.min(this.#ctx.settings.handlerConnections, spec.concurrency, withRows.length, Math.floor(batch.length / MIN_SUB_BATCH)) : 1;
    if (n <= 1) return [{ rows: batch, lanes, concurrency: spec.concurrency }];
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
    for (let spare = spec.concurrency - n; spare > 0; spare--) {
      const hungriest = parts.reduce((best, part) => (part.keys.size / part.concurrency > best.keys.size / best.concurrency ? part : best));
      if (hungriest.keys.size <= hungriest.concurrency) break;
      hungriest.concurrency++;
    }
    return parts.map(({ rows, lanes: own, concurrency }) => ({ rows, lanes: own, concurrency }));
  }

  /**
   * Handles a batch and acknowledges it. Fast mode runs the handlers without savepoints: handlers that
   * never touch `ctx.tx` need no transaction at all, and the acknowledgement is one statement. If a handler
   * that wrote through `ctx.tx` fails, its writes cannot be undone alone, so the batch is rolled back and
   * run again carefully: each attempt in its own savepoint (see AttemptScope). Returns true if a handler
   * wrote through `ctx.tx`.
   */
  async #handleBatch(
    rows: LogRow[],
    partitionOf: Map<LogRow, number>,
    lanes: Lane[],
    next: Map<number, LaneCursor>,
    counts: Map<number, number>,
    careful: boolean,
    concurrency: number,
    handledBefore: ReadonlySet<string>,
    previous: Acking | undefined,
    overlap: boolean,
  ): Promise<{ wrote: boolean; handled: string[]; acking?: Promise<void> }> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const published = new Set<string>();
    const parkedNow = new Set<string>();
    const held: HeldRow[] = [];
    const dead: DeadRow[] = [];
    const handledIds: string[] = [];
    const claimed = new Set<string>();
    let earliestRetry = 0;
    const scope = new SharedScope(driver, published, careful);

    const handleAll = async () => {
      await forEachLimit(groupByKey(rows), concurrency, async (group) => {
        let holding = this.#parked.has(group[0]!.key);
        for (const row of group) {
          const partition = partitionOf.get(row)!;
          const position = Number(row.position);
          if (holding) {
            held.push({ partition, key: row.key, position, message: null, attempts: 0, next_attempt_at: null, history: [] });
            continue;
          }
          // Handled before: a redelivery, or a publisher that sent it twice.
          if (row.seen === true || handledBefore.has(row.id)) continue;
          if (spec.inbox) {
            // The same id twice in one batch (a publish retried after a commit whose answer was lost).
            if (claimed.has(row.id)) continue;
            claimed.add(row.id);
          }
          const envelope = toEnvelope(row);
          const result = await this.#attempts(scope, envelope, 1, []);
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
          held.push({ partition, key: row.key, position, message: null, attempts: result.attempt, next_attempt_at: new Date(at).toISOString(), history: result.history });
          holding = true;
          parkedNow.add(row.key);
        }
      });
    };

    const ackStatement = (duplicates: 'skip' | 'fail'): Statement => ({
      name: `tidings.${sql.schema}.ack.${duplicates}`,
      text: sql.ack(duplicates),
      params: [
        spec.name,
        this.#owner,
        lanes.map((lane) => lane.partition),
        lanes.map((lane) => lane.epoch),
        lanes.map((lane) => next.get(lane.partition)!.done),
        lanes.map((lane) => next.get(lane.partition)!.window),
        lanes.map((lane) => next.get(lane.partition)!.position),
        lanes.map((lane) => counts.get(lane.partition) ?? 0),
        handledIds,
        JSON.stringify(held),
        JSON.stringify(dead),
        spec.topics,
      ],
    });

    const leaseLost = (error: unknown) => {
      const code = (error as { code?: unknown }).code;
      throw code === LEASE_LOST ? new LeaseLost() : code === TOPICS_CHANGED ? new TopicsChanged() : error;
    };
    // Acknowledgements commit in order: each is sent once the one before it has committed.
    try {
      if (careful) {
        await scope.run(async () => {
          await handleAll();
          await previous?.done;
          await runStatement(scope.connection!, ackStatement('skip'));
        });
      } else {
        await handleAll();
        if (scope.abandoned) {
          await scope.rollback();
          throw new ReplayCarefully();
        }
        try {
          await previous?.done;
        } catch (error) {
          if (scope.open) await scope.rollback();
          throw error;
        }
        // In the handlers' transaction, the acknowledgement travels with its COMMIT; without one, it commits alone.
        if (scope.open) await scope.commit(ackStatement('skip'));
        else if (overlap && held.length === 0 && dead.length === 0 && published.size === 0) {
          // Nothing else waits for it: no held key, no retry, no dead letter, no write. The next batch is
          // handled while it commits; if it fails, the loop puts the lanes back and reads both batches again.
          const acking = ackAlone(driver, ackStatement).then(() => undefined, leaseLost);
          acking.catch(() => undefined);
          return { wrote: false, handled: handledIds, acking };
        } else await ackAlone(driver, ackStatement);
      }
    } catch (error) {
      leaseLost(error);
    }
    for (const key of parkedNow) this.#parked.add(key);
    if (earliestRetry !== 0) this.#nextRetryAt = this.#nextRetryAt === 0 ? earliestRetry : Math.min(this.#nextRetryAt, earliestRetry);
    if (published.size > 0) this.#ctx.committed(published);
    return { wrote: careful || scope.open, handled: handledIds };
  }

  /** Runs one message's attempts: immediate retries in place, until it is acknowledged, delayed or dead. */
  async #attempts(scope: SharedScope, envelope: Envelope, firstAttempt: number, history: AttemptRecord[]): Promise<AttemptsResult> {
    for (let attempt = firstAttempt; ; attempt++) {
      const attemptScope = scope.attempt();
      let result: DeliveryResult;
      try {
        result = await this.#handle(new AttemptDelivery(envelope, attempt, attemptScope));
      } catch (error) {
        result = { outcome: 'retry', delayMs: 0, error: describeError(error) };
      }
      const lost = await attemptScope.end(result.outcome === 'ack');
      if (lost !== undefined) {
        result = {
          outcome: 'retry',
          delayMs: 0,
          error: describeError(new Error(`the handler returned, but a statement in its transaction failed, so its writes were rolled back: ${lost.message}`, { cause: lost })),
        };
      }
      if (result.outcome === 'ack') return ACKED;
      // In fast mode a failed attempt that wrote cannot be undone alone: the batch is replayed carefully.
      if (scope.abandoned) return { kind: 'retry', delayMs: 0, attempt, history };
      history.push({ attempt, at: new Date().toISOString(), error: result.error });
      if (result.outcome === 'dead-letter') return { kind: 'dead', reason: result.reason, history };
      if (result.delayMs > 0 || this.#stopping) return { kind: 'retry', delayMs: result.delayMs, attempt, history };
    }
  }

  /** Retries the heads of held keys whose time has come; a key whose head succeeds drains in order. */
  async #retryDue(): Promise<void> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const lanes = [...this.#lanes.values()];
    const partitions = lanes.map((lane) => lane.partition);
    this.#nextRetryAt = 0;
    const published = new Set<string>();
    const drained = new Set<string>();
    const scope = new SharedScope(driver, published, true);
    await scope.run(async () => {
      const tx = scope.connection!;
      const { rows: fence } = await tx.query<{ fenced: number }>(sql.fence, [spec.name, this.#owner, partitions, lanes.map((lane) => lane.epoch)]);
      if (Number(fence[0]?.fenced ?? 0) !== lanes.length) throw new LeaseLost();
      const { rows: heads } = await tx.query<HeldHead>(sql.dueHeads, [spec.name, partitions, spec.batchSize]);
      for (const first of heads) {
        let head: HeldHead | undefined = first;
        while (head !== undefined) {
          const envelope = head.message ?? (await this.#fromLog(tx, head.position));
          let outcome: AttemptsResult;
          if (envelope === undefined) {
            outcome = { kind: 'dead', reason: `message at position ${head.position} is no longer in the log`, history: head.history };
          } else if (spec.inbox && (await tx.query(sql.inboxClaim, [spec.name, envelope.id])).rows.length === 0) {
            outcome = { kind: 'ack' };
          } else {
            outcome = await this.#attempts(scope, envelope, head.attempts + 1, [...head.history]);
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

const ACKED: AttemptsResult = Object.freeze({ kind: 'ack' });

function describeDisagreement(
  subscription: string,
  self: string,
  topics: readonly string[],
  unable: readonly WorkerTopics[],
  able: readonly WorkerTopics[],
): string {
  const lacking = (worker: WorkerTopics) => topics.filter((topic) => !worker.topics!.includes(topic));
  const list = unable.map((worker) => `${worker.id === self ? 'this worker' : worker.id} (no handler for ${lacking(worker).join(', ')})`).join('; ');
  const fate =
    able.length === 0
      ? 'No live worker handles all of them, so every partition is held: nothing is skipped, and lag grows until one does'
      : `Their partitions go to the workers that handle all of them (${able.map((worker) => (worker.id === self ? 'this worker' : worker.id)).join(', ')})`;
  const hint = 'During a rolling deploy that adds or removes a handler this lasts until the old version\'s workers stop; otherwise give every worker of the subscription the same handlers';
  return `Subscription ${subscription}: its workers disagree on its topics (${topics.join(', ')}): ${list}. ${fate}. ${hint}`;
}

/** A delivery whose `tx` is the attempt's, made only if the handler (or a publish in it) reads it. */
class AttemptDelivery implements Delivery<PgTransaction> {
  constructor(
    readonly envelope: Envelope,
    readonly attempt: number,
    private readonly scope: Attempt,
  ) {}

  get tx(): PgTransaction {
    return this.scope.tx;
  }
}

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
 * Sends an acknowledgement that commits alone, its inbox insert failing on an id already recorded (the cheaper
 * statement); if one was (another worker handled a copy since the read), sends it again skipping those ids.
 */
async function ackAlone(driver: SqlDriver, ack: (duplicates: 'skip' | 'fail') => Statement): Promise<void> {
  try {
    await runStatement(preparing(driver), ack('fail'));
  } catch (error) {
    const { code, table } = error as { code?: unknown; table?: unknown };
    if (code !== UNIQUE_VIOLATION || (table !== undefined && table !== 'inbox')) throw error;
    await runStatement(preparing(driver), ack('skip'));
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

/** A dead letter to write. Its data stays in the log when the message has a position there (see `deadLetter`). */
function deadRow(subscription: string, envelope: Envelope, position: number | string | null, reason: string, attempts: AttemptRecord[]): DeadRow {
  const { data, ...attributes } = envelope;
  return {
    subscription,
    message_id: envelope.id,
    topic: envelope.topic,
    key: envelope.partitionkey,
    position: position === null ? null : Number(position),
    envelope: position === null ? envelope : (attributes as Envelope),
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

type ReadRow = LogRow & { lane_group: number | string; win: string; hi: number | string; range_end: number | string | null; partition: number };

/** An acknowledgement in flight (see #readAndHandle). */
interface Acking {
  readonly done: Promise<void>;
  /** Where its batch's lanes were: they go back there if it fails. */
  readonly before: ReadonlyArray<[Lane, LaneCursor]>;
  /** Message ids it records in the inbox: reads sent before it commits do not see them. */
  readonly handled: ReadonlySet<string>;
}

interface ReadAhead {
  /** The cursors it read from (cursorsKey). */
  readonly cursors: string;
  readonly rows: Promise<ReadRow[]>;
  /** Ids the batch before it handled (inbox subscriptions). */
  readonly handledBefore: Set<string>;
}

/** Lanes at the same cursor, together. */
function groupLanes(lanes: readonly Lane[]): Lane[][] {
  const groups = new Map<string, Lane[]>();
  for (const lane of lanes) {
    const key = `${lane.done}|${lane.window}|${lane.position}`;
    const group = groups.get(key);
    if (group === undefined) groups.set(key, [lane]);
    else group.push(lane);
  }
  return [...groups.values()];
}

/** Everything a read depends on of its lanes. */
function cursorsKey(grouped: readonly Lane[][]): string {
  return JSON.stringify(grouped.map((group) => [group.map((lane) => lane.partition), group[0]!.done, group[0]!.window, group[0]!.position, group[0]!.hi, group[0]!.span]));
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
