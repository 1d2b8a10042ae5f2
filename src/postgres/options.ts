/** The PostgreSQL backbone's options, their defaults, and their validation. */
import { OptionProblems, optionNames } from '../core/options.ts';
import { checkIdentifier } from './connection/identifiers.ts';
import type { PgPoolLike } from './connection/pg.ts';
import type { PGliteLike } from './connection/pglite.ts';
import { urlProblem } from './connection/url.ts';
import { resolveRetention, unknownRetentionKeys, type RetentionOptions } from './retention.ts';
import { tenancyProblems, type TenancyOptions } from './tenants.ts';

export interface PostgresOptions {
  /** A PostgreSQL connection URL (`postgres://user@host:5432/db`). */
  url?: string;
  /** Your own `pg` Pool instead of a URL; Tidings leaves it open on stop. */
  pool?: PgPoolLike;
  /** Run on embedded PostgreSQL (PGlite) in this process: `true`, or your own PGlite instance. */
  pglite?: true | PGliteLike;
  /** Where embedded PostgreSQL keeps its files; in memory when absent. */
  dataDir?: string;
  /** The schema holding Tidings' tables. */
  schema?: string;
  /** Connections in the pool Tidings opens for a URL. */
  poolSize?: number;
  /** Create or upgrade the schema on start. */
  migrate?: boolean;
  /** A partition lease lasts this long without renewal; a killed worker's partitions move after it. */
  leaseMs?: number;
  /** How often leases are renewed and partitions rebalanced between workers. */
  heartbeatMs?: number;
  /** Backstop poll while LISTEN works: a lost notification costs at most this much latency. */
  pollMs?: number;
  /** Poll interval when LISTEN is unavailable (a transaction-pooling proxy). */
  fallbackPollMs?: number;
  /** Idle time after which the notifier pings its connection. */
  notifierPingMs?: number;
  /** A publish in a transaction Tidings does not drive wakes consumers this long after the insert, hoping it has committed; the backstop poll covers the rest. */
  foreignCommitNudgeMs?: number;
  /** Group commit of publishes made outside a transaction. */
  publishBatch?: { maxBatch?: number; maxInFlight?: number };
  /** Called with problems Tidings recovers from by itself (a dropped connection, a failed batch). */
  onWarning?: (message: string, error?: unknown) => void;
  /**
   * Connections a batch may use when its handlers write through `ctx.tx`: the batch is split by partition
   * into this many transactions, handled at once (sharing the subscription's `concurrency`), each committed
   * with its own partitions' acknowledgement. Every subscription may hold this many pool connections while
   * a batch runs; 1 keeps one transaction per batch. Always 1 on embedded PostgreSQL (one session).
   * Default: 2 (4 measured slower end to end: more statements per batch, fewer connections left to publishers), at most half of `poolSize`.
   */
  handlerConnections?: number;
  /** How long handled messages, inbox records and dead letters are kept (see `retentionDefaults`); `false` keeps everything. */
  retention?: RetentionOptions | false;
  /** Tenant isolation enforced by PostgreSQL (row-level security): see `TenancyOptions` and docs/tenancy.md. */
  tenancy?: TenancyOptions;
}

const postgresOptionNames = optionNames<PostgresOptions>()(
  'url',
  'pool',
  'pglite',
  'dataDir',
  'schema',
  'poolSize',
  'migrate',
  'leaseMs',
  'heartbeatMs',
  'pollMs',
  'fallbackPollMs',
  'notifierPingMs',
  'foreignCommitNudgeMs',
  'publishBatch',
  'onWarning',
  'handlerConnections',
  'retention',
  'tenancy',
);

export const postgresDefaults = {
  schema: 'tidings',
  poolSize: 10,
  migrate: true,
  leaseMs: 10_000,
  heartbeatMs: 3_000,
  pollMs: 5_000,
  fallbackPollMs: 250,
  notifierPingMs: 10_000,
  foreignCommitNudgeMs: 10,
  publishBatch: { maxBatch: 1_000, maxInFlight: 2 },
  reconnectMinMs: 100,
  reconnectMaxMs: 5_000,
  errorBackoffMaxMs: 5_000,
  handlerConnections: 2,
  /** How often a process waiting for replies looks for them even without a notification. */
  replyPollMs: 1_000,
  /** Scheduled messages the scheduler moves into the log per statement. */
  scheduledBatch: 1_000,
  selfTestMs: 2_000,
} as const;

/** Checks `postgres()`'s options: INVALID_OPTIONS naming every problem, before anything connects. */
export function checkPostgresOptions(options: PostgresOptions): void {
  const problems = new OptionProblems('postgres()');
  problems.unknownKeys(options, postgresOptionNames);
  problems.unknownKeys(options.publishBatch, ['maxBatch', 'maxInFlight'], 'publishBatch.');
  if (options.retention !== undefined && options.retention !== false) unknownRetentionKeys(problems, options.retention);
  const sources = [options.url, options.pool, options.pglite].filter((source) => source !== undefined).length;
  problems.check(sources === 1, 'give exactly one of url (a connection URL), pool (a pg Pool) or pglite (true for embedded PostgreSQL)');
  const badUrl = options.url === undefined ? undefined : urlProblem(options.url);
  if (badUrl !== undefined) problems.check(false, badUrl);
  problems.integer('poolSize', options.poolSize, 2, 1_000);
  problems.integer('leaseMs', options.leaseMs, 1_000);
  problems.integer('heartbeatMs', options.heartbeatMs, 100);
  problems.integer('pollMs', options.pollMs, 10);
  problems.integer('fallbackPollMs', options.fallbackPollMs, 10);
  problems.integer('notifierPingMs', options.notifierPingMs, 100);
  problems.integer('foreignCommitNudgeMs', options.foreignCommitNudgeMs, 0);
  problems.integer('handlerConnections', options.handlerConnections, 1, 100);
  problems.integer('publishBatch.maxBatch', options.publishBatch?.maxBatch, 1, 100_000);
  problems.integer('publishBatch.maxInFlight', options.publishBatch?.maxInFlight, 1, 100);
  if (options.leaseMs !== undefined || options.heartbeatMs !== undefined) {
    const lease = options.leaseMs ?? postgresDefaults.leaseMs;
    const beat = options.heartbeatMs ?? postgresDefaults.heartbeatMs;
    problems.check(beat * 2 <= lease, `heartbeatMs (${beat}) must be at most half of leaseMs (${lease}), or leases expire between renewals`);
  }
  try {
    checkIdentifier('schema', options.schema ?? postgresDefaults.schema);
  } catch (error) {
    problems.check(false, (error as Error).message);
  }
  tenancyProblems(problems, options.tenancy, options.pglite !== undefined);
  problems.throwIfAny();
  if (options.retention !== undefined && options.retention !== false) resolveRetention('postgres() retention', options.retention);
}
