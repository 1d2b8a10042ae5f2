/**
 * Operating a Tidings schema: status, dead letters (list, group, show, redrive, drop), replay and tail.
 * Plain functions over a driver and a schema name, so the `tidings` CLI, tests and a web console share them.
 * None of them exits the process or prints: they return data or throw a TidingsError.
 *
 * Glossary: a *dead letter* is a message a subscription gave up on; to *redrive* it is to hand it back to
 * that subscription (through `held`, the table of keys waiting for a retry); to *replay* is to move every
 * cursor of a subscription back to a position, so it handles the log again from there.
 */
import { attributeProblem } from '../core/limits.ts';
import { hostname, userInfo } from 'node:os';
import type { AttemptRecord } from '../core/backbone.ts';
import type {
  DeadLetter,
  DeadLetterActionResult,
  DeadLetterGroup,
  DeadLetterProgress,
  DeadLetterSelection,
  DeadLetterStore,
  DeadLetterSummary,
} from '../core/dead-letters.ts';

import { keyHash, partitionOf, type Envelope } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import { sleep } from '../core/sleep.ts';
import { toEnvelope, type LogRow } from './log.ts';
import { checkIdentifier, type Queryable, type SqlDriver } from './driver.ts';

export type { DeadLetter, DeadLetterActionResult, DeadLetterGroup, DeadLetterProgress, DeadLetterSelection, DeadLetterSummary };

export const adminDefaults = {
  /** Dead letters moved per transaction by a redrive or a drop. */
  chunkSize: 500,
  /** Dead letters read to group them, where the store cannot group by itself (a broker's queue). */
  groupScanLimit: 10_000,
  /** Rows `listDeadLetters` returns. */
  listLimit: 100,
  /** How often `tailTopic` looks for new messages. */
  tailPollMs: 200,
  /** Messages `tailTopic` reads per query. */
  tailBatch: 500,
} as const;

// ---- status --------------------------------------------------------------------------------------

export interface PartitionStatus {
  readonly partition: number;
  /** The worker holding the lease, or null when no one does. */
  readonly owner: string | null;
  /** Bumped at every change of owner; a bigint in the table, far below 2^53 in practice. */
  readonly epoch: number;
  readonly leaseExpiresAt: string | null;
  /** Time left on the lease by the database's clock; negative once expired, null without a lease. */
  readonly leaseRemainingMs: number | null;
  readonly handled: number;
  /** Messages of this partition's topics and keys committed but not yet handled. */
  readonly lag: number;
  /** Age of the oldest of them (by publication time), null when there is none. */
  readonly oldestUnprocessedAgeMs: number | null;
  readonly updatedAt: string;
}

export interface WorkerStatus {
  readonly id: string;
  readonly subscription: string;
  readonly host: string;
  readonly pid: number;
  readonly startedAt: string;
  readonly expiresAt: string;
  readonly live: boolean;
  /** The topics it has handlers for; null for a worker of a version that did not record them. */
  readonly topics: string[] | null;
}

/** A live worker without a handler for some of its subscription's topics: it holds no partition meanwhile. */
export interface TopicDisagreement {
  readonly worker: string;
  readonly missing: string[];
}

export interface SubscriptionStatus {
  readonly name: string;
  readonly topics: string[];
  readonly partitions: number;
  readonly handled: number;
  readonly lag: number;
  readonly oldestUnprocessedAgeMs: number | null;
  /** Keys waiting for a retry (or a redrive) and the messages queued behind them. */
  readonly heldKeys: number;
  readonly heldMessages: number;
  readonly deadLetters: number;
  readonly cursors: PartitionStatus[];
  readonly workers: WorkerStatus[];
  /**
   * Live workers that lack a handler for some of the subscription's topics (a rolling deploy that adds or
   * removes one): they hold no partition, and the partitions go to workers that handle every topic.
   */
  readonly disagreements: TopicDisagreement[];
}

export interface Status {
  readonly schema: string;
  /** The database's clock when the status was read. */
  readonly at: string;
  readonly subscriptions: SubscriptionStatus[];
  readonly workers: WorkerStatus[];
  readonly heldKeys: number;
  readonly deadLetters: number;
}

export interface StatusOptions {
  readonly schema: string;
  /** Only this subscription. */
  readonly subscription?: string | undefined;
}

/**
 * Lag of a cursor: the log rows of its topics and partition whose transactions are not in `done`, less
 * those already handled in the window being worked through. Candidates come through the xid index
 * exactly as the consumer's read does (the transactions in progress at `done`, and newer ones), so a
 * caught-up subscription costs an index probe, not a scan of the log. A subscription of every topic ('*':
 * the outbox relay) counts every topic's rows (test/health.brokers.test.ts: the relay's backlog).
 */
function lagJoin(s: string, extra = 'true'): string {
  return `cross join lateral (
      select count(*)::int8 as lag, min(l.time) as oldest from ${s}.log l
      where (l.xid = any(array(select pg_snapshot_xip(c.done))) or l.xid >= pg_snapshot_xmax(c.done))
        and not pg_visible_in_snapshot(l.xid, c.done)
        and not (c.window_snapshot is not null and l.position <= c.window_position and pg_visible_in_snapshot(l.xid, c.window_snapshot))
        and (l.topic = any(sub.topics) or '*' = any(sub.topics)) and l.key_hash % sub.partitions = c.partition
        and ${extra}
    ) lag`;
}

export async function readStatus(db: Queryable, options: StatusOptions): Promise<Status> {
  const s = schemaOf(options.schema);
  const only = options.subscription ?? null;
  return explainMissingSchema(options.schema, async () => {
    const [clock, subscriptions, cursors, workers, held, dead] = await Promise.all([
      db.query<{ at: Date | string }>('select now() as at'),
      db.query<{ name: string; topics: string[]; partitions: number }>(
        `select name, topics, partitions from ${s}.subscriptions where $1::text is null or name = $1 order by name`,
        [only],
      ),
      db.query<{
        subscription: string;
        partition: number;
        owner: string | null;
        epoch: string;
        lease_expires_at: Date | string | null;
        lease_remaining_ms: number | string | null;
        handled: string | number;
        lag: string | number;
        oldest_ms: number | string | null;
        updated_at: Date | string;
      }>(
        `select c.subscription, c.partition, c.owner, c.epoch::text as epoch, c.lease_expires_at,
            (extract(epoch from c.lease_expires_at - now()) * 1000)::float8 as lease_remaining_ms,
            c.handled::int8 as handled, lag.lag, (extract(epoch from now() - lag.oldest) * 1000)::float8 as oldest_ms, c.updated_at
          from ${s}.cursors c join ${s}.subscriptions sub on sub.name = c.subscription
          ${lagJoin(s)}
          where $1::text is null or c.subscription = $1
          order by c.subscription, c.partition`,
        [only],
      ),
      db.query<{
        id: string;
        subscription: string;
        host: string;
        pid: number;
        started_at: Date | string;
        expires_at: Date | string;
        live: boolean;
        topics: string[] | null;
      }>(
        `select id, subscription, host, pid, started_at, expires_at, expires_at > now() as live, topics from ${s}.workers
          where $1::text is null or subscription = $1 order by subscription, started_at, id`,
        [only],
      ),
      db.query<{ subscription: string; keys: string | number; messages: string | number }>(
        `select subscription, count(distinct key)::int8 as keys, count(*)::int8 as messages from ${s}.held
          where $1::text is null or subscription = $1 group by subscription`,
        [only],
      ),
      db.query<{ subscription: string; count: string | number }>(
        `select subscription, count(*)::int8 as count from ${s}.dead_letters where $1::text is null or subscription = $1 group by subscription`,
        [only],
      ),
    ]);
    if (only !== null && subscriptions.rows.length === 0) throw await unknownSubscription(db, s, options.schema, only);
    const allWorkers: WorkerStatus[] = workers.rows.map((row) => ({
      id: row.id,
      subscription: row.subscription,
      host: row.host,
      pid: Number(row.pid),
      startedAt: iso(row.started_at),
      expiresAt: iso(row.expires_at),
      live: row.live,
      topics: row.topics,
    }));
    const heldBy = new Map(held.rows.map((row) => [row.subscription, { keys: Number(row.keys), messages: Number(row.messages) }]));
    const deadBy = new Map(dead.rows.map((row) => [row.subscription, Number(row.count)]));
    const result: SubscriptionStatus[] = subscriptions.rows.map((sub) => {
      const own = cursors.rows
        .filter((row) => row.subscription === sub.name)
        .map(
          (row): PartitionStatus => ({
            partition: Number(row.partition),
            owner: row.owner,
            epoch: Number(row.epoch),
            leaseExpiresAt: row.lease_expires_at === null ? null : iso(row.lease_expires_at),
            leaseRemainingMs: row.lease_remaining_ms === null ? null : Math.round(Number(row.lease_remaining_ms)),
            handled: Number(row.handled),
            lag: Number(row.lag),
            // Publication times come from the publishers' clocks: never report a negative age.
            oldestUnprocessedAgeMs: row.oldest_ms === null ? null : Math.max(0, Math.round(Number(row.oldest_ms))),
            updatedAt: iso(row.updated_at),
          }),
        );
      const ages = own.map((cursor) => cursor.oldestUnprocessedAgeMs).filter((age): age is number => age !== null);
      return {
        name: sub.name,
        topics: sub.topics,
        partitions: Number(sub.partitions),
        handled: own.reduce((sum, cursor) => sum + cursor.handled, 0),
        lag: own.reduce((sum, cursor) => sum + cursor.lag, 0),
        oldestUnprocessedAgeMs: ages.length === 0 ? null : Math.max(...ages),
        heldKeys: heldBy.get(sub.name)?.keys ?? 0,
        heldMessages: heldBy.get(sub.name)?.messages ?? 0,
        deadLetters: deadBy.get(sub.name) ?? 0,
        cursors: own,
        workers: allWorkers.filter((worker) => worker.subscription === sub.name),
        disagreements: allWorkers
          .filter((worker) => worker.subscription === sub.name && worker.live && worker.topics !== null && !worker.topics.includes('*'))
          .map((worker) => ({ worker: worker.id, missing: sub.topics.filter((topic) => !worker.topics!.includes(topic)) }))
          .filter((entry) => entry.missing.length > 0),
      };
    });
    return {
      schema: options.schema,
      at: iso(clock.rows[0]!.at),
      subscriptions: result,
      workers: allWorkers,
      heldKeys: [...heldBy.values()].reduce((sum, entry) => sum + entry.keys, 0),
      deadLetters: [...deadBy.values()].reduce((sum, count) => sum + count, 0),
    };
  });
}

// ---- dead letters --------------------------------------------------------------------------------

export interface ListDeadLettersOptions extends DeadLetterSelection {
  readonly schema: string;
  readonly limit?: number | undefined;
}

export async function listDeadLetters(db: Queryable, options: ListDeadLettersOptions): Promise<{ total: number; deadLetters: DeadLetterSummary[] }> {
  const s = schemaOf(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: false });
  const countParams = [...params];
  const limit = param(params, options.limit ?? adminDefaults.listLimit);
  return explainMissingSchema(options.schema, async () => {
    const [count, rows] = await Promise.all([
      db.query<{ total: string | number }>(`select count(*)::int8 as total from ${s}.dead_letters d where ${where}`, countParams),
      db.query<SummaryRow>(
        `select d.id::text as id, d.subscription, d.message_id, d.topic, d.key, d.position::int8 as position, d.reason,
            jsonb_array_length(d.attempts) as attempts, d.dead_at
          from ${s}.dead_letters d where ${where} order by d.id limit ${limit}`,
        params,
      ),
    ]);
    return { total: Number(count.rows[0]?.total ?? 0), deadLetters: rows.rows.map(toSummary) };
  });
}

/** Dead letters grouped by subscription and error, largest group first: what broke, and how often. */
export async function groupDeadLetters(db: Queryable, options: ListDeadLettersOptions): Promise<DeadLetterGroup[]> {
  const s = schemaOf(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: false });
  const uuid = param(params, '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}');
  const digits = param(params, '[0-9]+');
  const limit = param(params, options.limit ?? adminDefaults.listLimit);
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<{
      subscription: string;
      pattern: string;
      example: string;
      count: string | number;
      topics: string[];
      first_at: Date | string;
      last_at: Date | string;
    }>(
      `select d.subscription, regexp_replace(regexp_replace(d.reason, ${uuid}, '<id>', 'gi'), ${digits}, 'N', 'g') as pattern,
          min(d.reason) as example, count(*)::int8 as count, array_agg(distinct d.topic) as topics,
          min(d.dead_at) as first_at, max(d.dead_at) as last_at
        from ${s}.dead_letters d where ${where}
        group by 1, 2 order by count(*) desc, 1, 2 limit ${limit}`,
      params,
    );
    return rows.map((row) => ({
      subscription: row.subscription,
      pattern: row.pattern,
      example: row.example,
      count: Number(row.count),
      topics: row.topics,
      firstAt: iso(row.first_at),
      lastAt: iso(row.last_at),
    }));
  });
}

export interface ShowDeadLetterOptions {
  readonly schema: string;
  /** A dead-letter id, or a message id (which may have died in several subscriptions). */
  readonly id: string;
}

/** The dead letters with this id or message id, whole: envelope with data, and every attempt with its stack. */
export async function showDeadLetter(db: Queryable, options: ShowDeadLetterOptions): Promise<DeadLetter[]> {
  const s = schemaOf(options.schema);
  const params: unknown[] = [];
  const where = selectionSql({ ids: [options.id] }, params, { requireFilter: true });
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<SummaryRow & { envelope: Envelope; attempts_list: AttemptRecord[] }>(
      `select d.id::text as id, d.subscription, d.message_id, d.topic, d.key, d.position::int8 as position, d.reason,
          jsonb_array_length(d.attempts) as attempts, d.attempts as attempts_list, d.envelope, d.dead_at
        from ${s}.dead_letters d where ${where} order by d.id`,
      params,
    );
    return rows.map((row) => ({ ...toSummary(row), envelope: row.envelope, attempts: row.attempts_list }));
  });
}

export interface DeadLetterActionOptions extends DeadLetterSelection {
  readonly schema: string;
  /** Who does this, for the audit table: defaults to the OS user and host (`alice@ops-1`). */
  readonly actor?: string | undefined;
  readonly chunkSize?: number | undefined;
  readonly onProgress?: ((progress: DeadLetterProgress) => void) | undefined;
  /** Stops between chunks; what was done stays done (and audited). */
  readonly signal?: AbortSignal | undefined;
}

export interface RedriveOptions extends DeadLetterActionOptions {
  /** At most this many messages per second (done in chunks of at most this size); unlimited when absent. */
  readonly ratePerSecond?: number | undefined;
}

/** How many dead letters a selection matches now, without changing anything. */
export async function countDeadLetters(db: Queryable, options: DeadLetterSelection & { readonly schema: string }): Promise<number> {
  const s = schemaOf(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: true });
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<{ total: string | number }>(`select count(*)::int8 as total from ${s}.dead_letters d where ${where}`, params);
    return Number(rows[0]?.total ?? 0);
  });
}

/**
 * Hands dead letters back to their subscriptions, oldest first, keeping each message's id so that inboxes
 * still de-duplicate. Each is moved into `held` with its whole envelope, in its key's partition; the first
 * of a key becomes due at once unless the key already waits for a retry, in which case the redriven
 * messages queue behind it. So per-key order is kept, among the redriven messages and with what the key
 * already holds. Running workers are told by the `!held:<subscription>` signal; stopped ones find the rows
 * when they acquire the partition. Each chunk is one transaction that also writes its audit rows.
 */
export async function redriveDeadLetters(driver: SqlDriver, options: RedriveOptions): Promise<DeadLetterActionResult> {
  const rate = options.ratePerSecond;
  if (rate !== undefined && !(Number.isFinite(rate) && rate > 0)) {
    throw new TidingsError('INVALID_OPTIONS', `ratePerSecond must be a positive number of messages per second, got ${rate}`);
  }
  const s = schemaOf(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: true });
  return explainMissingSchema(options.schema, async () => {
    const partitions = await redriveTargets(driver, s, options.schema, where, params);
    return inChunks(driver, {
      action: 'redrive',
      s,
      where,
      params,
      options,
      // A chunk never holds more than a second's worth of the rate, so the pace stays even.
      chunkSize: rate === undefined ? chunkOf(options) : Math.max(1, Math.min(chunkOf(options), Math.floor(rate))),
      ratePerSecond: rate,
      // Why lock held: a worker drains a key by deleting its head and reading the key's next row in one
      // transaction. Asking "does this key hold rows?" while such a transaction is uncommitted would see a
      // head about to vanish, and leave the redriven rows with no due head: stuck. SHARE ROW EXCLUSIVE
      // waits for those writers and holds new ones back for the few milliseconds of this chunk.
      begin: (tx) => tx.query(`lock table ${s}.held in share row exclusive mode`).then(() => undefined),
      move: async (tx, rows) => {
        const firstOfKey = new Set<string>();
        const moves = rows.map((row) => {
          const count = partitions.get(row.subscription);
          if (count === undefined) throw notRedrivable(options.schema, row.subscription);
          // Dead-lettered for breaking a limit: handed back, it would break it again (held keys are indexed).
          const broken = attributeProblem({ id: row.message_id, partitionkey: row.key }, false);
          if (broken !== undefined) {
            throw new TidingsError(
              'LIMIT_EXCEEDED',
              `Dead letter ${row.id} of ${row.subscription} cannot be redriven: its ${broken}. Drop it (tidings dead-letters drop ${row.id}), and publish a corrected copy if it is still needed`,
            );
          }
          const keyId = JSON.stringify([row.subscription, row.key]);
          const first = !firstOfKey.has(keyId);
          firstOfKey.add(keyId);
          return { id: row.id, partition: partitionOf(keyHash(row.key), count), first };
        });
        // The envelope goes from dead_letters to held inside the database; ordinality keeps the order.
        await tx.query(
          `insert into ${s}.held (subscription, partition, key, position, message, attempts, next_attempt_at, history)
            select d.subscription, r.partition, d.key, d.position, d.envelope, 0,
              case when r.first and not exists (select 1 from ${s}.held h where h.subscription = d.subscription and h.key = d.key) then now() end,
              '[]'::jsonb
            from rows from (json_to_recordset($1::json) as (id bigint, partition integer, first boolean)) with ordinality as r(id, partition, first, n)
            join ${s}.dead_letters d on d.id = r.id
            order by r.n`,
          [JSON.stringify(moves)],
        );
      },
      // Delivered when the chunk commits: running workers of the subscription reload their held keys.
      after: async (tx, subscriptions) => {
        for (const subscription of subscriptions) await tx.query('select pg_notify($1, $2)', [options.schema, `!held:${subscription}`]);
      },
    });
  });
}

/** The dead letters of a schema behind the backbone-neutral interface the CLI and the conformance suite use. */
export function deadLetterStore(driver: () => Promise<SqlDriver>, schema: string): DeadLetterStore {
  return {
    list: async (selection) => listDeadLetters(await driver(), { ...selection, schema }),
    group: async (selection) => groupDeadLetters(await driver(), { ...selection, schema }),
    show: async (id) => showDeadLetter(await driver(), { id, schema }),
    count: async (selection) => countDeadLetters(await driver(), { ...selection, schema }),
    redrive: async (request) => redriveDeadLetters(await driver(), { ...request, schema }),
    drop: async (request) => dropDeadLetters(await driver(), { ...request, schema }),
  };
}

/** Deletes dead letters for good, in chunks, each audited in its own transaction. */
export async function dropDeadLetters(driver: SqlDriver, options: DeadLetterActionOptions): Promise<DeadLetterActionResult> {
  const s = schemaOf(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: true });
  return explainMissingSchema(options.schema, () =>
    inChunks(driver, { action: 'drop', s, where, params, options, chunkSize: chunkOf(options), ratePerSecond: undefined }),
  );
}

interface ChunkRow {
  id: string;
  subscription: string;
  message_id: string;
  key: string;
}

interface ChunkPlan {
  readonly action: 'redrive' | 'drop';
  readonly s: string;
  readonly where: string;
  readonly params: readonly unknown[];
  readonly options: DeadLetterActionOptions;
  readonly chunkSize: number;
  readonly ratePerSecond: number | undefined;
  /** In the chunk's transaction, before its dead letters are chosen. */
  readonly begin?: (tx: Queryable) => Promise<void>;
  /** In the chunk's transaction, before its dead letters are deleted. */
  readonly move?: (tx: Queryable, rows: ChunkRow[]) => Promise<void>;
  /** In the chunk's transaction, after the audit rows, with the subscriptions it touched. */
  readonly after?: (tx: Queryable, subscriptions: string[]) => Promise<void>;
}

async function inChunks(driver: SqlDriver, plan: ChunkPlan): Promise<DeadLetterActionResult> {
  const { s, options } = plan;
  const actor = options.actor ?? defaultActor();
  const bound = [...plan.params];
  // Only what exists now: a redriven message that fails again must not be redriven again by this run.
  const { rows: head } = await driver.query<{ max: string | null; total: string | number }>(
    `select max(d.id)::text as max, count(*)::int8 as total from ${s}.dead_letters d where ${plan.where}`,
    bound,
  );
  const total = Number(head[0]?.total ?? 0);
  const maxId = param(bound, head[0]?.max ?? '0');
  const limit = param(bound, plan.chunkSize);
  const result = { matched: total, count: 0, bySubscription: {} as Record<string, number>, messageIds: [] as string[], stopped: false };
  options.onProgress?.({ done: 0, total });
  const started = Date.now();
  while (result.count < total) {
    if (options.signal?.aborted) {
      result.stopped = true;
      break;
    }
    const rows = await driver.transaction(async (tx) => {
      await plan.begin?.(tx);
      const { rows: chosen } = await tx.query<ChunkRow>(
        `select d.id::text as id, d.subscription, d.message_id, d.key from ${s}.dead_letters d
          where ${plan.where} and d.id <= ${maxId}::int8 order by d.id limit ${limit} for update`,
        bound,
      );
      if (chosen.length === 0) return chosen;
      await plan.move?.(tx, chosen);
      await tx.query(`delete from ${s}.dead_letters where id = any($1::int8[])`, [chosen.map((row) => row.id)]);
      const bySubscription = groupBy(chosen, (row) => row.subscription);
      for (const [subscription, group] of bySubscription) {
        await tx.query(`insert into ${s}.dead_letter_actions (action, actor, subscription, message_ids, count) values ($1, $2, $3, $4, $5)`, [
          plan.action,
          actor,
          subscription,
          group.map((row) => row.message_id),
          group.length,
        ]);
      }
      await plan.after?.(tx, [...bySubscription.keys()]);
      return chosen;
    });
    if (rows.length === 0) break; // another operator took the rest
    for (const row of rows) {
      result.bySubscription[row.subscription] = (result.bySubscription[row.subscription] ?? 0) + 1;
      result.messageIds.push(row.message_id);
    }
    result.count += rows.length;
    options.onProgress?.({ done: result.count, total });
    if (plan.ratePerSecond !== undefined && result.count < total) {
      await sleep(started + (result.count / plan.ratePerSecond) * 1000 - Date.now(), options.signal);
    }
  }
  return result;
}

async function redriveTargets(db: Queryable, s: string, schema: string, where: string, params: readonly unknown[]): Promise<Map<string, number>> {
  const { rows } = await db.query<{ subscription: string; partitions: number | null }>(
    `select d.subscription, max(sub.partitions) as partitions
      from ${s}.dead_letters d left join ${s}.subscriptions sub on sub.name = d.subscription
      where ${where} group by d.subscription`,
    params,
  );
  const missing = rows.find((row) => row.partitions === null);
  if (missing !== undefined) throw notRedrivable(schema, missing.subscription);
  return new Map(rows.map((row) => [row.subscription, Number(row.partitions)]));
}

function notRedrivable(schema: string, subscription: string): TidingsError {
  return new TidingsError(
    'INVALID_OPTIONS',
    `Dead letters of subscription ${subscription} cannot be redriven: schema ${schema} has no such subscription any more (its partition count decides where each key goes). Start a bus with that subscription, or leave it out of the selection`,
  );
}

// ---- replay --------------------------------------------------------------------------------------

export interface ReplayOptions {
  readonly schema: string;
  readonly subscription: string;
  /** Handle again every message from this log position on. */
  readonly fromPosition?: number | undefined;
  /** Handle again every message published at or after this time (the first position at or after it). */
  readonly fromTime?: Date | string | undefined;
}

export interface ReplayResult {
  readonly subscription: string;
  readonly fromPosition: number;
  readonly partitions: number;
  /** Messages of its topics at or after `fromPosition` that the subscription will now handle (again). */
  readonly messages: number;
  /** Inbox records removed so that the replayed messages are not de-duplicated away. */
  readonly inboxCleared: number;
  /** Messages before `fromPosition` that had not been handled yet: moving the cursors skips them. */
  readonly skipped: number;
}

/**
 * Moves every cursor of a subscription to `fromPosition`: its partitions read the log again from there,
 * in commit order. A cursor becomes an open window (`done` empty, the window the current snapshot, the
 * position just before `fromPosition`), and its epoch is bumped with the owner cleared: a running worker's
 * next acknowledgement is refused by the epoch fence, so it drops the partition (rolling back that batch)
 * and takes it again, from the new cursor, on its next heartbeat. One transaction, so the inbox records
 * of the replayed messages disappear exactly when the cursors move.
 */
export async function replaySubscription(driver: SqlDriver, options: ReplayOptions): Promise<ReplayResult> {
  const s = schemaOf(options.schema);
  if ((options.fromPosition === undefined) === (options.fromTime === undefined)) {
    throw new TidingsError('INVALID_OPTIONS', 'replay needs exactly one of fromPosition (a log position) or fromTime (a time)');
  }
  if (options.fromPosition !== undefined && !(Number.isSafeInteger(options.fromPosition) && options.fromPosition >= 1)) {
    throw new TidingsError('INVALID_OPTIONS', `fromPosition must be a log position (an integer from 1), got ${options.fromPosition}`);
  }
  const fromTime = options.fromTime === undefined ? undefined : new Date(options.fromTime);
  if (fromTime !== undefined && Number.isNaN(fromTime.getTime())) {
    throw new TidingsError('INVALID_OPTIONS', `fromTime must be a time, got ${String(options.fromTime)}`);
  }
  return explainMissingSchema(options.schema, () =>
    driver.transaction(async (tx) => {
      const { rows: subs } = await tx.query<{ topics: string[]; partitions: number }>(
        `select topics, partitions from ${s}.subscriptions where name = $1 for update`,
        [options.subscription],
      );
      const sub = subs[0];
      if (sub === undefined) throw await unknownSubscription(tx, s, options.schema, options.subscription);
      const from = options.fromPosition ?? (await firstPositionAt(tx, { schema: options.schema, time: fromTime!, topics: sub.topics }));
      // Row locks on the cursors wait for in-flight acknowledgements, so nothing moves them under us.
      await tx.query(`select partition from ${s}.cursors where subscription = $1 for update`, [options.subscription]);
      const { rows: skipped } = await tx.query<{ skipped: string | number }>(
        `select coalesce(sum(lag.lag), 0)::int8 as skipped from ${s}.cursors c join ${s}.subscriptions sub on sub.name = c.subscription
          ${lagJoin(s, 'l.position < $2')}
          where c.subscription = $1`,
        [options.subscription, from],
      );
      await tx.query(
        `update ${s}.cursors set done = '1:1:'::pg_snapshot, window_snapshot = pg_current_snapshot(), window_position = $2,
            epoch = epoch + 1, owner = null, lease_expires_at = null, updated_at = now()
          where subscription = $1`,
        [options.subscription, from - 1],
      );
      const cleared = await tx.query(
        `delete from ${s}.inbox i using ${s}.log l
          where i.subscription = $1 and i.message_id = l.id and l.position >= $2 and l.topic = any($3::text[])`,
        [options.subscription, from, sub.topics],
      );
      const { rows: count } = await tx.query<{ messages: string | number }>(
        `select count(*)::int8 as messages from ${s}.log where position >= $1 and topic = any($2::text[])`,
        [from, sub.topics],
      );
      return {
        subscription: options.subscription,
        fromPosition: from,
        partitions: Number(sub.partitions),
        messages: Number(count[0]?.messages ?? 0),
        inboxCleared: cleared.rowCount ?? 0,
        skipped: Number(skipped[0]?.skipped ?? 0),
      };
    }),
  );
}

export interface PositionAtOptions {
  readonly schema: string;
  readonly time: Date | string;
  readonly topics: readonly string[];
}

/**
 * The first log position of `topics` published at or after `time`; past the end of the log when there is
 * none. Publication time follows position closely but not exactly (clocks, commit order), which is
 * precise enough to say where a replay or a tail begins.
 */
export async function firstPositionAt(db: Queryable, options: PositionAtOptions): Promise<number> {
  const s = schemaOf(options.schema);
  const { rows } = await explainMissingSchema(options.schema, () =>
    db.query<{ position: string }>(
      `select coalesce(
          (select min(position) from ${s}.log where time >= $1 and topic = any($2::text[])),
          (select coalesce(max(position), 0) + 1 from ${s}.log))::text as position`,
      [new Date(options.time).toISOString(), options.topics],
    ),
  );
  return Number(rows[0]!.position);
}

// ---- tail ----------------------------------------------------------------------------------------

export interface TailOptions {
  readonly schema: string;
  readonly topic: string;
  readonly key?: string | undefined;
  readonly type?: string | undefined;
  readonly tenant?: string | undefined;
  /** Case-insensitive text in the data's JSON. */
  readonly grep?: string | undefined;
  /** Begin at this log position (older messages included); from now when absent. */
  readonly fromPosition?: number | undefined;
  readonly pollMs?: number | undefined;
  /** Ends the iteration. */
  readonly signal?: AbortSignal | undefined;
}

export interface TailedMessage {
  readonly position: number;
  readonly envelope: Envelope;
}

/**
 * Follows a topic's new messages, in commit order, by polling. It reads with snapshots like a consumer
 * (not "position greater than the last one seen", which skips a transaction that committed after a
 * later-numbered one) and keeps no state in the database: it is safe to point at production.
 */
export async function* tailTopic(db: Queryable, options: TailOptions): AsyncGenerator<TailedMessage> {
  const s = schemaOf(options.schema);
  const pollMs = options.pollMs ?? adminDefaults.tailPollMs;
  const snapshot = async () => (await db.query<{ snapshot: string }>('select pg_current_snapshot()::text as snapshot')).rows[0]!.snapshot;
  let done: string;
  let window: string | null = null;
  let after = 0;
  if (options.fromPosition !== undefined) {
    done = '1:1:';
    window = await snapshot();
    after = options.fromPosition - 1;
  } else {
    done = await snapshot();
  }
  const params: unknown[] = [];
  const filters = [`l.topic = ${param(params, options.topic)}`];
  if (options.key !== undefined) filters.push(`l.key = ${param(params, options.key)}`);
  if (options.type !== undefined) filters.push(`l.type = ${param(params, options.type)}`);
  if (options.tenant !== undefined) filters.push(`l.tenant = ${param(params, options.tenant)}`);
  if (options.grep !== undefined) filters.push(`l.data::text ilike ${param(params, `%${escapeLike(options.grep)}%`)}`);
  const [doneAt, windowAt, afterAt, limitAt] = [1, 2, 3, 4].map((n) => `$${params.length + n}`);
  const read = `select l.position::int8 as position, l.topic, l.id, l.type, l.source, l.time, l.subject, l.key, l.key_hash,
      l.tenant, l.correlation_id, l.causation_id, l.traceparent, l.tracestate, l.data
    from ${s}.log l
    where (l.xid = any(array(select pg_snapshot_xip(${doneAt}::pg_snapshot))) or l.xid >= pg_snapshot_xmax(${doneAt}::pg_snapshot))
      and pg_visible_in_snapshot(l.xid, ${windowAt}::pg_snapshot)
      and l.position > ${afterAt}
      and ${filters.join(' and ')}
    order by l.position limit ${limitAt}`;
  const stopped = () => options.signal?.aborted === true;
  while (!stopped()) {
    window ??= await snapshot();
    const { rows } = await explainMissingSchema(options.schema, () => db.query<LogRow>(read, [...params, done, window, after, adminDefaults.tailBatch]));
    for (const row of rows) {
      if (stopped()) return;
      yield { position: Number(row.position), envelope: toEnvelope(row) };
    }
    if (rows.length === adminDefaults.tailBatch) {
      after = Number(rows[rows.length - 1]!.position);
      continue;
    }
    done = window;
    window = null;
    after = 0;
    await sleep(pollMs, options.signal);
  }
}

// ---- helpers -------------------------------------------------------------------------------------

/** `alice@ops-1`: the OS user and host, for the audit table when no actor is named. */
export function defaultActor(): string {
  let user = process.env.USER ?? process.env.USERNAME ?? 'unknown';
  try {
    user = userInfo().username;
  } catch {
    // No passwd entry (some containers): the environment's name will do.
  }
  return `${user}@${hostname()}`;
}

interface SummaryRow {
  id: string;
  subscription: string;
  message_id: string;
  topic: string;
  key: string;
  position: string | number | null;
  reason: string;
  attempts: number;
  dead_at: Date | string;
}

function toSummary(row: SummaryRow): DeadLetterSummary {
  return {
    id: row.id,
    subscription: row.subscription,
    messageId: row.message_id,
    topic: row.topic,
    key: row.key,
    position: row.position === null ? null : Number(row.position),
    reason: row.reason,
    attempts: Number(row.attempts),
    deadAt: iso(row.dead_at),
  };
}

/** The WHERE clause of a selection over `dead_letters d`; values go to `params`, never into the text. */
function selectionSql(selection: DeadLetterSelection, params: unknown[], rules: { requireFilter: boolean }): string {
  const clauses: string[] = [];
  const ids = selection.ids ?? [];
  if (ids.length > 0) {
    const numeric = ids.filter((id) => /^\d{1,18}$/.test(id));
    clauses.push(`(d.id = any(${param(params, numeric)}::int8[]) or d.message_id = any(${param(params, [...ids])}::text[]))`);
  }
  if (selection.subscription !== undefined) clauses.push(`d.subscription = ${param(params, selection.subscription)}`);
  if (selection.topic !== undefined) clauses.push(`d.topic = ${param(params, selection.topic)}`);
  if (selection.errorText !== undefined) {
    const pattern = param(params, `%${escapeLike(selection.errorText)}%`);
    clauses.push(`(d.reason ilike ${pattern} or exists (select 1 from jsonb_array_elements(d.attempts) a where a -> 'error' ->> 'message' ilike ${pattern}))`);
  }
  if (clauses.length === 0 && rules.requireFilter && selection.all !== true) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      'Name the dead letters (by ids, subscription, topic or error text), or select all of them explicitly with all: true',
    );
  }
  return clauses.length === 0 ? 'true' : clauses.join(' and ');
}

function param(params: unknown[], value: unknown): string {
  params.push(value);
  return `$${params.length}`;
}

function escapeLike(text: string): string {
  return text.replace(/[\\%_]/g, (char) => `\\${char}`);
}

/** The schema as quoted SQL, once validated. */
export function schemaOf(schema: string): string {
  return `"${checkIdentifier('schema', schema)}"`;
}

function chunkOf(options: { readonly chunkSize?: number | undefined }): number {
  const size = options.chunkSize ?? adminDefaults.chunkSize;
  if (!(Number.isSafeInteger(size) && size >= 1)) throw new TidingsError('INVALID_OPTIONS', `chunkSize must be a positive integer, got ${size}`);
  return size;
}

/** A schema that was never migrated, or migrated by an older version, gets an error that says what to do. */
export async function explainMissingSchema<T>(schema: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    if (code === '42P01' || code === '3F000') {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Schema ${schema} has no Tidings tables, or older ones (${(error as Error).message}): run "tidings migrate --schema ${schema}", or check --schema`,
        { cause: error },
      );
    }
    throw error;
  }
}

async function unknownSubscription(db: Queryable, s: string, schema: string, name: string): Promise<TidingsError> {
  const { rows } = await db.query<{ name: string }>(`select name from ${s}.subscriptions order by name`);
  const known = rows.map((row) => row.name);
  return new TidingsError(
    'INVALID_OPTIONS',
    `Schema ${schema} has no subscription ${name}; ${known.length === 0 ? 'it has none yet' : `it has ${known.join(', ')}`}`,
  );
}

function groupBy<T>(items: readonly T[], keyOf: (item: T) => string): Map<string, T[]> {
  const groups = new Map<string, T[]>();
  for (const item of items) {
    const key = keyOf(item);
    const group = groups.get(key);
    if (group === undefined) groups.set(key, [item]);
    else group.push(item);
  }
  return groups;
}

export function iso(value: Date | string): string {
  return value instanceof Date ? value.toISOString() : new Date(value).toISOString();
}

// ---- dropping a subscription ----------------------------------------------------------------------

export interface DropSubscriptionResult {
  readonly subscription: string;
  /** Held messages and inbox records removed with it; its dead letters are kept (drop them apart). */
  readonly held: number;
  readonly inbox: number;
}

/**
 * Removes a subscription that is gone for good (renamed, or a command that moved to another owner): its
 * cursors, workers, held messages and inbox. Refused while a worker of it is alive: stop them first, or
 * they would register it again. Its dead letters stay, to inspect or drop.
 */
export async function dropSubscription(driver: SqlDriver, options: { schema: string; subscription: string }): Promise<DropSubscriptionResult> {
  const s = schemaOf(options.schema);
  return explainMissingSchema(options.schema, () =>
    driver.transaction(async (tx) => {
      const { rows: subs } = await tx.query(`select name from ${s}.subscriptions where name = $1 for update`, [options.subscription]);
      if (subs.length === 0) throw await unknownSubscription(tx, s, options.schema, options.subscription);
      const { rows: live } = await tx.query<{ id: string }>(`select id from ${s}.workers where subscription = $1 and expires_at > now()`, [
        options.subscription,
      ]);
      if (live.length > 0) {
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Subscription ${options.subscription} has ${live.length} live worker${live.length === 1 ? '' : 's'} (${live.map((worker) => worker.id).join(', ')}): stop ${live.length === 1 ? 'it' : 'them'} first, or ${live.length === 1 ? 'it' : 'they'} would register it again`,
        );
      }
      const held = await tx.query(`delete from ${s}.held where subscription = $1`, [options.subscription]);
      const inbox = await tx.query(`delete from ${s}.inbox where subscription = $1`, [options.subscription]);
      await tx.query(`delete from ${s}.subscriptions where name = $1`, [options.subscription]);
      return { subscription: options.subscription, held: held.rowCount ?? 0, inbox: inbox.rowCount ?? 0 };
    }),
  );
}
