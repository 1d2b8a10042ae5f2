/**
 * The PostgreSQL backbone (backbone.ts): a log table read in commit order, LISTEN/NOTIFY wake-ups, partition
 * leases, and a transactional outbox for free. This file is `tidings/postgres`: the factory and re-exports.
 *
 * The folder: options.ts, backbone.ts, connection/ (driver.ts: pg and PGlite behind one interface; pg.ts with
 * pg-session.ts, pglite.ts; errors.ts, identifiers.ts, url.ts), transaction.ts (the transaction a handler or
 * `bus.transaction` gets), codec.ts (row <-> envelope), publisher.ts (group commit,
 * COPY), notifier.ts, statements.ts (the engine's SQL) and sql/ (operator and retention SQL), consume/ (the
 * consumer: leases, lanes, batch, acknowledgement, held keys), dead-letters.ts, scheduler.ts (messages due
 * later), replies.ts, registry.ts, inbox.ts and lazy-transaction.ts (a broker's deliveries through the outbox),
 * tenants.ts (row-level security), quotas.ts (tenants' token buckets), retention.ts, observe.ts, migrate.ts and migrations/, ops/ (operator functions).
 */
import { PostgresBackbone } from './backbone.ts';
import type { PostgresOptions } from './options.ts';

export { PostgresBackbone } from './backbone.ts';
export { postgresDefaults, type PostgresOptions } from './options.ts';
export type { PgTransaction } from './transaction.ts';
export { tenancyDefaults, type TenancyOptions } from './tenants.ts';
export type { Queryable, SqlDriver } from './connection/driver.ts';
export type { PgPoolLike } from './connection/pg.ts';
export type { PGliteLike } from './connection/pglite.ts';
export { readServices } from './registry.ts';
export { migrate, appliedVersions, migrationScript, pendingMigrations, type PlannedMigration } from './migrate.ts';

export * from './ops/index.ts';
export {
  Retention,
  prune,
  retentionDefaults,
  type PruneOptions,
  type PruneResult,
  type RetentionOptions,
  type RetentionPolicy,
  type RetentionSettings,
} from './retention.ts';
export * from './ops/tenants.ts';

/** The PostgreSQL backbone, on a server (`url` or `pool`) or embedded (`pglite: true`). */
export function postgres(options: PostgresOptions): PostgresBackbone {
  return new PostgresBackbone(options);
}
