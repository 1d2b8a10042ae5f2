/**
 * The migrations' SQL ships inside the JavaScript (src/postgres/migrations/index.ts) so that a bundled
 * application starts; the .sql files beside it stay the source of truth. These two must agree.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { migrationsModule, MODULE } from '../scripts/migrations.ts';
import { loadMigrations, migrationScript, pendingMigrations } from '../src/postgres/migrate.ts';

test('the generated migrations module matches the .sql files', () => {
  assert.equal(
    readFileSync(MODULE, 'utf8'),
    migrationsModule(),
    'src/postgres/migrations/index.ts is out of date with the .sql files beside it: run npm run migrations, and commit both',
  );
});

test('migrations are numbered 1, 2, 3... with no gap, each with statements', () => {
  const migrations = loadMigrations();
  assert.deepEqual(
    migrations.map((migration) => migration.version),
    migrations.map((_, index) => index + 1),
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
