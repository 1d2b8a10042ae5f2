/**
 * Dead letters kept in PostgreSQL: the `dead_letters` table, one row per message a subscription gave up on,
 * with its envelope and every attempt's error. Listing, grouping and showing are queries; redrive and drop
 * work in audited chunks (ops/chunks.ts). To *redrive* is to hand a dead letter back to its subscription
 * only, through `held` (the table of keys waiting for a retry), keeping the message's id so that inboxes
 * still de-duplicate.
 *
 * The functions take a driver and a schema, for tools that have no bus; `PostgresDeadLetters` is the same
 * behind the backbone-neutral DeadLetterStore the CLI and the conformance suite use.
 */
import type {
  DeadLetter,
  DeadLetterActionRequest,
  DeadLetterActionResult,
  DeadLetterGroup,
  DeadLetterProgress,
  DeadLetterSelection,
  DeadLetterStore,
  DeadLetterSummary,
} from '../core/dead-letters.ts';
import { keyHash, partitionOf, type Envelope } from '../core/envelope.ts';
import type { AttemptRecord } from '../core/errors.ts';
import { TidingsError } from '../core/errors.ts';
import { attributeProblem } from '../core/limits.ts';
import { iso } from './codec.ts';
import type { Queryable, SqlDriver } from './connection/driver.ts';
import { chunkOf, inChunks, type ChunkedActionOptions } from './ops/chunks.ts';
import { adminDefaults } from './ops/options.ts';
import { explainMissingSchema } from './ops/schema.ts';
import { deadLetterStatements, selectionSql } from './sql/dead-letters.ts';

export type { DeadLetter, DeadLetterActionResult, DeadLetterGroup, DeadLetterProgress, DeadLetterSelection, DeadLetterSummary };

export interface ListDeadLettersOptions extends DeadLetterSelection {
  readonly schema: string;
  readonly limit?: number | undefined;
}

export interface ShowDeadLetterOptions {
  readonly schema: string;
  /** A dead-letter id, or a message id (which may have died in several subscriptions). */
  readonly id: string;
}

export interface DeadLetterActionOptions extends DeadLetterSelection, ChunkedActionOptions {}

export interface RedriveOptions extends DeadLetterActionOptions {
  /** At most this many messages per second (done in chunks of at most this size); unlimited when absent. */
  readonly ratePerSecond?: number | undefined;
}

/** The dead letters of a schema, as every backbone's dead-letters.ts offers them. */
export class PostgresDeadLetters implements DeadLetterStore {
  /** `driver` opens the backbone if needed: a store is handed out before the bus starts. */
  constructor(
    private readonly driver: () => Promise<SqlDriver>,
    private readonly schema: string,
  ) {}

  async list(selection: DeadLetterSelection & { readonly limit?: number | undefined }): Promise<{ total: number; deadLetters: DeadLetterSummary[] }> {
    return listDeadLetters(await this.driver(), { ...selection, schema: this.schema });
  }

  async group(selection: DeadLetterSelection & { readonly limit?: number | undefined }): Promise<DeadLetterGroup[]> {
    return groupDeadLetters(await this.driver(), { ...selection, schema: this.schema });
  }

  async show(id: string): Promise<DeadLetter[]> {
    return showDeadLetter(await this.driver(), { id, schema: this.schema });
  }

  async count(selection: DeadLetterSelection): Promise<number> {
    return countDeadLetters(await this.driver(), { ...selection, schema: this.schema });
  }

  async redrive(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return redriveDeadLetters(await this.driver(), { ...request, schema: this.schema });
  }

  async drop(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return dropDeadLetters(await this.driver(), { ...request, schema: this.schema });
  }
}

/** The dead letters of a schema behind the backbone-neutral interface the CLI and the conformance suite use. */
export function deadLetterStore(driver: () => Promise<SqlDriver>, schema: string): DeadLetterStore {
  return new PostgresDeadLetters(driver, schema);
}

export async function listDeadLetters(db: Queryable, options: ListDeadLettersOptions): Promise<{ total: number; deadLetters: DeadLetterSummary[] }> {
  const sql = deadLetterStatements(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: false });
  const countParams = [...params];
  const list = sql.list(where, params, options.limit ?? adminDefaults.listLimit);
  return explainMissingSchema(options.schema, async () => {
    const [count, rows] = await Promise.all([db.query<{ total: string | number }>(sql.count(where), countParams), db.query<SummaryRow>(list, params)]);
    return { total: Number(count.rows[0]?.total ?? 0), deadLetters: rows.rows.map(toSummary) };
  });
}

/** Dead letters grouped by subscription and error, largest group first: what broke, and how often. */
export async function groupDeadLetters(db: Queryable, options: ListDeadLettersOptions): Promise<DeadLetterGroup[]> {
  const sql = deadLetterStatements(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: false });
  const group = sql.group(where, params, options.limit ?? adminDefaults.listLimit);
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<{
      subscription: string;
      pattern: string;
      example: string;
      count: string | number;
      topics: string[];
      first_at: Date | string;
      last_at: Date | string;
    }>(group, params);
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

/** The dead letters with this id or message id, whole: envelope with data, and every attempt with its stack. */
export async function showDeadLetter(db: Queryable, options: ShowDeadLetterOptions): Promise<DeadLetter[]> {
  const sql = deadLetterStatements(options.schema);
  const params: unknown[] = [];
  const where = selectionSql({ ids: [options.id] }, params, { requireFilter: true });
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<SummaryRow & { envelope: Envelope; attempts_list: AttemptRecord[] }>(sql.show(where), params);
    return rows.map((row) => ({ ...toSummary(row), envelope: row.envelope, attempts: row.attempts_list }));
  });
}

/** How many dead letters a selection matches now, without changing anything. */
export async function countDeadLetters(db: Queryable, options: DeadLetterSelection & { readonly schema: string }): Promise<number> {
  const sql = deadLetterStatements(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: true });
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<{ total: string | number }>(sql.count(where), params);
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
  const sql = deadLetterStatements(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: true });
  return explainMissingSchema(options.schema, async () => {
    const partitions = await redriveTargets(driver, sql.redriveTargets(where), options.schema, params);
    return inChunks(driver, {
      action: 'redrive',
      sql,
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
      begin: (tx) => tx.query(sql.lockHeld).then(() => undefined),
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
        await tx.query(sql.redrive, [JSON.stringify(moves)]);
      },
      // Delivered when the chunk commits: running workers of the subscription reload their held keys.
      after: async (tx, subscriptions) => {
        for (const subscription of subscriptions) await tx.query(sql.notify, [options.schema, `!held:${subscription}`]);
      },
    });
  });
}

/** Deletes dead letters for good, in chunks, each audited in its own transaction. */
export async function dropDeadLetters(driver: SqlDriver, options: DeadLetterActionOptions): Promise<DeadLetterActionResult> {
  const sql = deadLetterStatements(options.schema);
  const params: unknown[] = [];
  const where = selectionSql(options, params, { requireFilter: true });
  return explainMissingSchema(options.schema, () =>
    inChunks(driver, { action: 'drop', sql, where, params, options, chunkSize: chunkOf(options), ratePerSecond: undefined }),
  );
}

async function redriveTargets(db: Queryable, statement: string, schema: string, params: readonly unknown[]): Promise<Map<string, number>> {
  const { rows } = await db.query<{ subscription: string; partitions: number | null }>(statement, params);
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
