import type { Queryable, SqlDriver } from './connection/driver.ts';
import { migrations } from './migrations/index.ts';

interface Migration {
  readonly version: number;
  readonly name: string;
  readonly sql: string;
}

/**
 * Every migration, oldest first: from the .sql files when Tidings runs from its sources, from inside the
 * JavaScript in the built package (see migrations/index.ts), so that a bundled application starts.
 */
export function loadMigrations(): readonly Migration[] {
  return migrations;
}

/** One migration as it will run: its statements, `{{schema}}` filled in, then the row that records it. */
export interface PlannedMigration {
  readonly version: number;
  readonly name: string;
  readonly statements: readonly string[];
}

/**
 * The statements that open a migration: an advisory lock (many processes may start at once: it serialises
 * them), the schema and the table recording applied versions. `schema` must be a validated identifier.
 */
function migrationLock(schema: string): readonly string[] {
  return [
    `select pg_advisory_xact_lock(hashtext('tidings.migrate.${schema}'))`,
    `create schema if not exists "${schema}"`,
    `create table if not exists "${schema}".migrations (version integer primary key, name text not null, applied_at timestamptz not null default now())`,
  ];
}

/**
 * What brings `schema` from the `applied` versions to the newest: the statements `migrate` runs, and
 * `tidings migrate --dry-run` prints for a DBA. Values are literals (no parameters), so the printed SQL is
 * exactly what runs.
 */
export function pendingMigrations(schema: string, applied: ReadonlySet<number>): PlannedMigration[] {
  return loadMigrations()
    .filter((migration) => !applied.has(migration.version))
    .map((migration) => ({
      version: migration.version,
      name: migration.name,
      statements: [
        ...statements(migration.sql.replaceAll('{{schema}}', `"${schema}"`)),
        `insert into "${schema}".migrations (version, name) values (${migration.version}, '${migration.name}')`,
      ],
    }));
}

/** The versions already applied to `schema`; none when it or its migrations table does not exist yet. */
export async function appliedVersions(db: Queryable, schema: string): Promise<Set<number>> {
  const { rows: exists } = await db.query<{ found: boolean }>(`select to_regclass($1) is not null as found`, [`"${schema}".migrations`]);
  if (exists[0]?.found !== true) return new Set();
  const { rows } = await db.query<{ version: number }>(`select version from "${schema}".migrations`);
  return new Set(rows.map((row) => Number(row.version)));
}

/**
 * Brings `schema` up to the newest version. Idempotent and safe to run from many processes at once: an
 * advisory lock serialises them, and each version is applied in the same transaction as its record.
 * `schema` must already be a validated identifier.
 */
export async function migrate(driver: SqlDriver, schema: string): Promise<{ applied: number[] }> {
  const applied: number[] = [];
  await driver.transaction(async (tx) => {
    for (const statement of migrationLock(schema)) await tx.query(statement);
    // Read under the lock: a process that waited sees what the one before it applied.
    for (const migration of pendingMigrations(schema, await appliedVersions(tx, schema))) {
      for (const statement of migration.statements) await tx.query(statement);
      applied.push(migration.version);
    }
  });
  return { applied };
}

/** What `migrate` would run on `schema` after the `applied` versions, as one script a DBA can read and run with psql. */
export function migrationScript(schema: string, applied: ReadonlySet<number>): string {
  const lines = [
    `-- Tidings: migrations of schema "${schema}", as \`tidings migrate\` runs them, in one transaction.`,
    'begin;',
    ...migrationLock(schema).map((s) => `${s};`),
  ];
  for (const migration of pendingMigrations(schema, applied)) {
    lines.push('', `-- ${String(migration.version).padStart(3, '0')}_${migration.name}`, ...migration.statements.map((s) => `${s};`));
  }
  lines.push('commit;');
  return `${lines.join('\n')}\n`;
}

/**
 * Splits a migration into statements, one per `;` at the end of a line. Our migrations keep to that
 * (a function body stays on one line), which lets one runner serve both `pg` and PGlite, whose query takes
 * one statement.
 */
function statements(sql: string): string[] {
  return sql
    .split(/;\s*$/m)
    .map((statement) => statement.replace(/^\s*--.*$/gm, '').trim())
    .filter((statement) => statement.length > 0);
}
