/**
 * The migrations' SQL ships inside the built JavaScript (scripts/migrations.ts writes
 * dist/postgres/migrations/index.js) so that a bundled application starts; from the sources, it is read
 * from the .sql files. The two must hold the same migrations.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { embeddedModule } from '../scripts/migrations.ts';
import { migrations } from '../src/postgres/migrations/index.ts';
import { loadMigrations, migrationScript, pendingMigrations } from '../src/postgres/migrate.ts';

test('the built module holds exactly the migrations the .sql files do, byte for byte', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidings-migrations-'));
  try {
    const file = join(dir, 'index.mjs');
    writeFileSync(file, embeddedModule());
    const built = (await import(pathToFileURL(file).href)) as { migrations: typeof migrations };
    assert.deepEqual(built.migrations, migrations);
    assert.ok(
      migrations.some((migration) => migration.sql.includes('`')),
      'the escaping is exercised: a migration has a backtick',
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('migrations are numbered 1, 2, 3... with no gap, each with statements', () => {
  const all = loadMigrations();
  assert.deepEqual(
    all.map((migration) => migration.version),
    all.map((_, index) => index + 1),
  );
  for (const migration of pendingMigrations('s', new Set())) assert.ok(migration.statements.length >= 2, `${migration.name} has statements`);
});

test('the dry-run script holds every pending statement once, with the schema filled in, in one transaction', () => {
  const script = migrationScript('shop_1', new Set([1]));
  assert.match(script, /^-- Tidings: migrations of schema "shop_1"/);
  assert.match(script, /\nbegin;\n/);
  assert.match(script, /\ncommit;\n$/);
  assert.doesNotMatch(script, /\{\{schema\}\}/);
  assert.doesNotMatch(script, /-- 001_initial/, 'an applied migration is not printed');
  for (const migration of pendingMigrations('shop_1', new Set([1]))) {
    for (const statement of migration.statements) assert.equal(script.split(`${statement};`).length, 2, `printed once: ${statement.slice(0, 60)}`);
  }
});
