import { readdir, readFile } from 'node:fs/promises';
import type { SqlDriver } from './driver.ts';

const MIGRATIONS = new URL('./migrations/', import.meta.url);

export interface Migration {
  readonly version: number;
  readonly name: string;
  readonly sql: string;
}

export async function loadMigrations(): Promise<Migration[]> {
  const files = (await readdir(MIGRATIONS)).filter((file) => /^\d+_.+\.sql$/.test(file)).sort();
  return Promise.all(
    files.map(async (file) => ({
      version: Number.parseInt(file, 10),
      name: file.replace(/^\d+_|\.sql$/g, ''),
      sql: await readFile(new URL(file, MIGRATIONS), 'utf8'),
    })),
  );
}

/**
 * Brings `schema` up to the newest version. Idempotent and safe to run from many processes at once: an
 * advisory lock serialises them, and each version is applied in its own transaction exactly once.
 * `schema` must already be a validated identifier.
 */
export async function migrate(driver: SqlDriver, schema: string): Promise<{ applied: number[] }> {
  const migrations = await loadMigrations();
  const applied: number[] = [];
  await driver.transaction(async (tx) => {
    await tx.query('select pg_advisory_xact_lock(hashtext($1))', [`tidings.migrate.${schema}`]);
    await tx.query(`create schema if not exists "${schema}"`);
    await tx.query(
      `create table if not exists "${schema}".migrations (version integer primary key, name text not null, applied_at timestamptz not null default now())`,
    );
    const { rows } = await tx.query<{ version: number }>(`select version from "${schema}".migrations`);
    const done = new Set(rows.map((row) => Number(row.version)));
    for (const migration of migrations) {
      if (done.has(migration.version)) continue;
      for (const statement of statements(migration.sql.replaceAll('{{schema}}', `"${schema}"`))) await tx.query(statement);
      await tx.query(`insert into "${schema}".migrations (version, name) values ($1, $2)`, [migration.version, migration.name]);
      applied.push(migration.version);
    }
  });
  return { applied };
}

/**
 * Splits a migration into statements, one per `;` at the end of a line. Our migrations keep to that
 * (no function bodies), which lets one runner serve both `pg` and PGlite, whose query takes one statement.
 */
function statements(sql: string): string[] {
  return sql
    .split(/;\s*$/m)
    .map((statement) => statement.replace(/^\s*--.*$/gm, '').trim())
    .filter((statement) => statement.length > 0);
}
