/**
 * Retention: storage stays bounded by default. Three tables grow with traffic, and each is pruned by age:
 *
 * - the log: a row older than its topic's age is deleted once every subscription of its topic has handled
 *   it. "Handled" is what the consumer itself relies on: for the subscription's cursor of the row's
 *   partition (key_hash % partitions), the row's transaction is visible in the cursor's `done` snapshot
 *   (or the row is at or before the position reached in the window being worked through, as the
 *   acknowledgement records), and the row is not waiting in `held` (a key waiting for a retry reads its
 *   rows back from the log).
 *   `force` deletes old rows whatever the subscriptions have done: for a subscription abandoned for good.
 * - the inbox: records older than the de-duplication window. A message delivered again after it (a redrive
 *   of a month-old dead letter) is handled again.
 * - dead letters: older than their window, whatever was done with them.
 *
 * Every statement deletes at most `batchSize` rows and commits on its own, so no lock is held for long and
 * nothing a consumer does waits for retention: log rows are never locked by anyone else, and inbox records
 * and dead letters locked by someone (a redrive in progress) are skipped until the next run. The log is
 * walked by its primary key a window of `batchSize` rows at a time, from the oldest, and the walk stops at
 * the first window with nothing old enough for any policy, so a run reads little more than what it deletes
 * (rows kept because a subscription has not handled them are read again by each run, until it does).
 *
 * Proven by test/retention.pg.test.ts.
 */
import { hostname } from 'node:os';
import { OptionProblems, optionNames } from '../core/options.ts';
import type { Queryable } from './connection/driver.ts';
import { checkIdentifier } from './connection/identifiers.ts';
import { retentionStatements, type RetentionStatements } from './sql/retention.ts';

const DAY = 86_400_000;
/** An answer to a request is read within its timeout; one still there an hour later has nobody waiting for it. */
const REPLY_MAX_AGE_MS = 3_600_000;

export interface RetentionOptions {
  log?: {
    /** Log rows older than this are deleted once handled; `null` keeps the log forever. */
    maxAgeMs?: number | null;
    /** Ages by topic, overriding `maxAgeMs`; `null` keeps that topic forever. */
    topics?: Readonly<Record<string, number | null>>;
    /** Delete old rows even if a subscription has not handled them yet (it will never see them). */
    force?: boolean;
  };
  /** The inbox's de-duplication window; `null` keeps inbox records forever. */
  inbox?: { maxAgeMs?: number | null };
  /** How long dead letters are kept; `null` keeps them forever. */
  deadLetters?: { maxAgeMs?: number | null };
  /** Time between runs of a started Retention. */
  intervalMs?: number;
  /** Rows examined (log) or deleted (inbox, dead letters) by one statement, each its own transaction. */
  batchSize?: number;
  /** VACUUM a table after a run deleted from it, rather than wait for autovacuum (tests and the soak). */
  vacuum?: boolean;
}

export const retentionDefaults = {
  log: { maxAgeMs: 7 * DAY, topics: {}, force: false },
  inbox: { maxAgeMs: 14 * DAY },
  deadLetters: { maxAgeMs: 30 * DAY },
  intervalMs: 60_000,
  batchSize: 1_000,
  vacuum: false,
} as const;

export interface RetentionPolicy {
  readonly log: { readonly maxAgeMs: number | null; readonly topics: Readonly<Record<string, number | null>>; readonly force: boolean };
  readonly inbox: { readonly maxAgeMs: number | null };
  readonly deadLetters: { readonly maxAgeMs: number | null };
  readonly intervalMs: number;
  readonly batchSize: number;
  readonly vacuum: boolean;
}

/** Reports misspelt keys of postgres({ retention }) (the Retention class adds its own, so not in resolveRetention). */
export function unknownRetentionKeys(problems: OptionProblems, options: RetentionOptions): void {
  problems.unknownKeys(options, optionNames<RetentionOptions>()('log', 'inbox', 'deadLetters', 'intervalMs', 'batchSize', 'vacuum'), 'retention.');
  problems.unknownKeys(options.log, ['maxAgeMs', 'topics', 'force'], 'retention.log.');
  problems.unknownKeys(options.inbox, ['maxAgeMs'], 'retention.inbox.');
  problems.unknownKeys(options.deadLetters, ['maxAgeMs'], 'retention.deadLetters.');
}

/** Validates retention options (every bad one named in one INVALID_OPTIONS error) and fills in the defaults. */
export function resolveRetention(where: string, options: RetentionOptions = {}): RetentionPolicy {
  const problems = new OptionProblems(where);
  const age = (name: string, value: unknown) => {
    if (value !== null) problems.integer(name, value, 0);
  };
  age('log.maxAgeMs', options.log?.maxAgeMs);
  for (const [topic, ms] of Object.entries(options.log?.topics ?? {})) age(`log.topics[${JSON.stringify(topic)}]`, ms);
  problems.oneOf('log.force', options.log?.force, [true, false]);
  age('inbox.maxAgeMs', options.inbox?.maxAgeMs);
  age('deadLetters.maxAgeMs', options.deadLetters?.maxAgeMs);
  problems.integer('intervalMs', options.intervalMs, 100);
  problems.integer('batchSize', options.batchSize, 1, 100_000);
  problems.oneOf('vacuum', options.vacuum, [true, false]);
  problems.throwIfAny();
  const d = retentionDefaults;
  return {
    log: {
      maxAgeMs: options.log?.maxAgeMs === undefined ? d.log.maxAgeMs : options.log.maxAgeMs,
      topics: { ...d.log.topics, ...options.log?.topics },
      force: options.log?.force ?? d.log.force,
    },
    inbox: { maxAgeMs: options.inbox?.maxAgeMs === undefined ? d.inbox.maxAgeMs : options.inbox.maxAgeMs },
    deadLetters: { maxAgeMs: options.deadLetters?.maxAgeMs === undefined ? d.deadLetters.maxAgeMs : options.deadLetters.maxAgeMs },
    intervalMs: options.intervalMs ?? d.intervalMs,
    batchSize: options.batchSize ?? d.batchSize,
    vacuum: options.vacuum ?? d.vacuum,
  };
}

export interface PruneOptions extends RetentionOptions {
  /** The schema of Tidings' tables. */
  readonly schema: string;
  /** Count what would be deleted, delete nothing. */
  readonly dryRun?: boolean;
  /** Stops the run between two statements. */
  readonly signal?: AbortSignal;
}

export interface PruneResult {
  readonly dryRun: boolean;
  readonly log: {
    /** Rows read by the walk. */
    readonly examined: number;
    /** Rows older than their topic's age. */
    readonly expired: number;
    /** Expired rows deleted (would be, in a dry run). */
    readonly deleted: number;
    /** Expired rows kept because a subscription has not handled them yet, or a key is held on them. */
    readonly kept: number;
  };
  readonly inbox: { readonly deleted: number };
  readonly deadLetters: { readonly deleted: number };
  /** Answers to requests nobody waited for any more (they timed out), older than an hour. */
  readonly replies: { readonly deleted: number };
  /** Statements run: each a short transaction of its own. */
  readonly statements: number;
  readonly ms: number;
  /** True if the signal stopped the run before it was done. */
  readonly stopped: boolean;
}

/**
 * Runs retention once over `options.schema`: the log, then the inbox, then dead letters, each in batches.
 * Safe to run while workers publish and consume, and from several processes at once.
 */
export async function prune(db: Queryable, options: PruneOptions): Promise<PruneResult> {
  const schema = checkIdentifier('schema', options.schema);
  const policy = resolveRetention('prune()', options);
  const sql = retentionStatements(schema);
  const dryRun = options.dryRun ?? false;
  const started = Date.now();
  let statements = 0;
  const stopped = () => options.signal?.aborted === true;
  const log = { examined: 0, expired: 0, deleted: 0, kept: 0 };

  const topics = Object.keys(policy.log.topics);
  const ages = topics.map((topic) => policy.log.topics[topic] ?? null);
  const kept = [policy.log.maxAgeMs, ...ages].filter((age): age is number => age !== null);
  if (kept.length > 0) {
    const youngest = Math.min(...kept);
    let after = '0';
    while (!stopped()) {
      const { rows } = await db.query<{ examined: number; last: string | null; expired: number; doomed: number; deleted: number; old: boolean }>(sql.log, [
        after,
        policy.batchSize,
        topics,
        ages,
        policy.log.maxAgeMs,
        policy.log.force,
        dryRun,
        youngest,
      ]);
      statements++;
      const row = rows[0]!;
      log.examined += row.examined;
      log.expired += row.expired;
      log.deleted += dryRun ? row.doomed : row.deleted;
      log.kept += row.expired - row.doomed;
      // The end of the log, or a window of rows too young for every policy: the rest is younger still
      // (positions follow commit time, give or take the transactions in flight).
      if (row.examined < policy.batchSize || !row.old || row.last === null) break;
      after = row.last;
    }
  }

  const sweep = async (maxAgeMs: number | null, statement: { delete: string; count: string }): Promise<number> => {
    if (maxAgeMs === null || stopped()) return 0;
    if (dryRun) {
      statements++;
      return Number((await db.query<{ deleted: number }>(statement.count, [maxAgeMs])).rows[0]?.deleted ?? 0);
    }
    let total = 0;
    while (!stopped()) {
      const { rows } = await db.query<{ deleted: number }>(statement.delete, [maxAgeMs, policy.batchSize]);
      statements++;
      const deleted = Number(rows[0]?.deleted ?? 0);
      total += deleted;
      if (deleted < policy.batchSize) break;
    }
    return total;
  };
  const inbox = await sweep(policy.inbox.maxAgeMs, sql.inbox);
  const deadLetters = await sweep(policy.deadLetters.maxAgeMs, sql.deadLetters);
  const replies = await sweep(REPLY_MAX_AGE_MS, sql.replies);

  if (policy.vacuum && !dryRun && !stopped()) {
    // Outside any transaction: VACUUM cannot run in one (the driver's query is a statement of its own).
    for (const [table, deleted] of [
      ['log', log.deleted],
      ['inbox', inbox],
      ['dead_letters', deadLetters],
    ] as const) {
      if (deleted === 0) continue;
      await db.query(sql.vacuum(table));
      statements++;
    }
  }

  return {
    dryRun,
    log,
    inbox: { deleted: inbox },
    deadLetters: { deleted: deadLetters },
    replies: { deleted: replies },
    statements,
    ms: Date.now() - started,
    stopped: stopped(),
  };
}

export interface RetentionSettings extends RetentionOptions {
  readonly schema: string;
  /** Called with what a run could not do (a lost connection); the next run tries again. */
  readonly onWarning?: (message: string, error?: unknown) => void;
  /** Called after each run that this process took its turn for. */
  readonly onRun?: (result: PruneResult) => void;
}

/**
 * Prunes a schema every `intervalMs` while started. Of several processes running it on one schema, one
 * prunes per interval (the `retention` table records whose turn it was); the others skip that turn.
 *
 *   const retention = new Retention(driver, { schema: 'tidings' });
 *   retention.start();
 *   ...
 *   await retention.stop(); // stops between two statements and waits for the statement in flight
 */
export class Retention {
  readonly policy: RetentionPolicy;
  readonly #db: Queryable;
  readonly #settings: RetentionSettings;
  readonly #runner = `${hostname()}:${process.pid}:${Math.random().toString(36).slice(2, 8)}`;
  readonly #sql: RetentionStatements;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<unknown> | undefined;
  #abort: AbortController | undefined;
  #started = false;

  constructor(db: Queryable, settings: RetentionSettings) {
    checkIdentifier('schema', settings.schema);
    this.policy = resolveRetention('retention', settings);
    this.#db = db;
    this.#settings = settings;
    this.#sql = retentionStatements(settings.schema);
  }

  /** Schedules runs: the first soon (a process that restarts often still prunes), then every interval. */
  start(): void {
    if (this.#started) return;
    this.#started = true;
    this.#schedule(Math.min(this.policy.intervalMs, 5_000) * (0.5 + Math.random() / 2));
  }

  async stop(): Promise<void> {
    this.#started = false;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#abort?.abort();
    await this.#running?.catch(() => undefined);
  }

  /**
   * One run now. With `claim` (what the timer does), it first takes this interval's turn and returns
   * undefined if another process already took it.
   */
  async runOnce(options: { claim?: boolean } = {}): Promise<PruneResult | undefined> {
    const abort = (this.#abort = new AbortController());
    const run = (async () => {
      if (options.claim === true) {
        // A turn is a little shorter than the interval, so the jitter of several processes never skips one.
        const { rows } = await this.#db.query(this.#sql.claim, [this.#runner, this.policy.intervalMs * 0.9]);
        if (rows.length === 0 || abort.signal.aborted) return undefined;
      }
      return prune(this.#db, { ...this.#settings, signal: abort.signal });
    })();
    this.#running = run;
    try {
      return await run;
    } finally {
      if (this.#running === run) this.#running = undefined;
    }
  }

  #schedule(delayMs: number): void {
    if (!this.#started) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.runOnce({ claim: true })
        .then((result) => {
          if (result !== undefined && !result.stopped) this.#settings.onRun?.(result);
        })
        .catch((error: unknown) =>
          this.#settings.onWarning?.(`Retention of schema ${this.#settings.schema} failed; trying again in ${this.policy.intervalMs} ms`, error),
        )
        .finally(() => this.#schedule(this.policy.intervalMs * (0.9 + Math.random() / 5)));
    }, delayMs);
    // Retention never keeps a process alive by itself.
    this.#timer.unref();
  }
}
