/**
 * `tidings migrate --dry-run` prints SQL for a DBA to run by hand: run that way, it must leave the schema
 * exactly as `migrate` does, and a bus started afterwards must find nothing left to apply.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { PGlite } from '@electric-sql/pglite';
import { createBus } from '../src/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { pgliteDriver } from '../src/postgres/connection/pglite.ts';
import { migrate, migrationScript } from '../src/postgres/migrate.ts';
import { Ticked } from './fixtures/contracts.ts';
import { waitFor } from './helpers.ts';

let db: PGlite;
before(async () => {
  db = await PGlite.create();
});
after(async () => {
  await db.close();
});

/** Tables, columns, indexes and functions of `schema`, as text to compare. */
async function shape(schema: string): Promise<string[]> {
  const { rows } = await db.query<{ item: string }>(
    `select 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '') as item
       from information_schema.columns where table_schema = $1
     union all select 'index ' || tablename || ' ' || replace(indexdef, $1, 'S') from pg_indexes where schemaname = $1
     union all select 'function ' || p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = $1
     order by 1`,
    [schema],
  );
  return rows.map((row) => row.item);
}

test('the dry-run script, run by hand, builds the schema migrate builds; a bus then starts on it', async () => {
  await db.exec(migrationScript('by_hand', new Set()));
  const driver = await pgliteDriver({ db });
  assert.deepEqual((await migrate(driver, 'by_hand')).applied, [], 'nothing left to apply after the script');
  assert.ok((await migrate(driver, 'by_migrate')).applied.length > 0);
  const normalise = (items: string[], schema: string) => items.map((item) => item.replaceAll(`"${schema}"`, 'S').replaceAll(`${schema}.`, 'S.'));
  assert.deepEqual(normalise(await shape('by_hand'), 'by_hand'), normalise(await shape('by_migrate'), 'by_migrate'));

  const bus = createBus({ service: 'dba', backbone: postgres({ pglite: db, schema: 'by_hand', migrate: false, onWarning: () => undefined }) });
  let handled = 0;
  bus.subscribe('counting', Ticked, () => {
    handled++;
  });
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 1 });
  await waitFor('the message handled on the hand-migrated schema', () => handled === 1);
  await bus.stop();
});
