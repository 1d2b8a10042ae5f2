/**
 * The `tidings` CLI across a backbone per tenant: stamps in the config file (here two schemas of one
 * database, and a stamp that cannot be reached), read by the real binary against a real PostgreSQL server.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import pg from 'pg';
import { pgWorld, type PgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { DATABASE_URL, runTidings, sql, uniqueSchema, waitFor } from './helpers.ts';

/** `count` dead letters of `subscription` in the world's schema, messages of `tenant`: a handler that always fails, no retries. */
async function makeDeadLetters(world: PgWorld, tenant: string, subscription: string, count: number): Promise<void> {
  const bus = world.bus('cli-stamps');
  bus.subscribe(
    subscription,
    Ticked,
    () => {
      throw new Error('always fails');
    },
    { retry: { immediate: 0, delayed: [] } },
  );
  await bus.start();
  await bus.publishMany(
    Ticked,
    Array.from({ length: count }, (_, i) => ({ key: `k${i % 3}`, seq: i + 1 })),
    { tenant },
  );
  await waitFor(`${count} dead letters in ${world.schema}`, async () => {
    const [row] = await sql(`select count(*)::int as n from "${world.schema}".dead_letters where subscription = $1`, [subscription]);
    return row.n === count;
  });
  await bus.stop();
}

/** The database of test/stamps.pg.test.ts's second stamp, created if missing; its URL. */
async function secondDatabase(): Promise<string> {
  const name = 'tidings_stamp_b';
  const found = await sql('select 1 from pg_database where datname = $1', [name]);
  if (found.length === 0) {
    await sql(`create database "${name}"`).catch((error: { code?: string }) => {
      // 42P04: it exists; 23505: another session created it at the same moment.
      if (error.code !== '42P04' && error.code !== '23505') throw error;
    });
  }
  const url = new URL(DATABASE_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

test('stamps: status and dead letters per tenant, --stamp narrows, changes need --stamp, an unreachable stamp is reported while the others print', async (t) => {
  const acme = await pgWorld(t, 'clisa');
  const globex = await pgWorld(t, 'clisg');
  if (acme === undefined || globex === undefined) return;
  await makeDeadLetters(acme, 'acme', 'billing', 3);
  await makeDeadLetters(globex, 'globex', 'billing', 5);

  const dir = mkdtempSync(join(tmpdir(), 'tidings-cli-stamps-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const config = join(dir, 'tidings.config.json');
  const write = (stamps: Record<string, unknown>) => writeFileSync(config, JSON.stringify({ url: DATABASE_URL, connectTimeout: 3, stamps }));
  const tidings = (args: readonly string[]) => runTidings(['--config', config, ...args], { ...process.env, DATABASE_URL: '' });
  // A third tenant in a database of its own, its schema made by the CLI on that stamp alone.
  const initech = { url: await secondDatabase(), schema: uniqueSchema('clisi') };
  t.after(async () => {
    const client = new pg.Client({ connectionString: initech.url });
    await client.connect();
    await client.query(`drop schema if exists "${initech.schema}" cascade`).finally(() => client.end());
  });
  write({ acme: { schema: acme.schema }, globex: { schema: globex.schema }, initech });
  const migrated = await tidings(['--stamp', 'initech', 'migrate']);
  assert.equal(migrated.code, 0, migrated.stderr);

  // Every stamp, keyed by tenant.
  const counted = await tidings(['--json', 'dead-letters', 'count']);
  assert.equal(counted.code, 0, counted.stderr);
  assert.deepEqual(JSON.parse(counted.stdout), { acme: 3, globex: 5, initech: 0 });
  write({ acme: { schema: acme.schema }, globex: { schema: globex.schema } });
  const listed = await tidings(['--json', 'dead-letters', 'list']);
  assert.equal(listed.code, 0, listed.stderr);
  const lists = JSON.parse(listed.stdout);
  assert.deepEqual([lists.acme.total, lists.acme.deadLetters.length, lists.globex.total, lists.globex.deadLetters.length], [3, 3, 5, 5]);
  const table = await tidings(['dead-letters', 'list']);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /^TENANT +ID +SUBSCRIPTION/m);
  assert.equal(table.stdout.match(/^acme +\d+ +billing/gm)?.length, 3);
  assert.equal(table.stdout.match(/^globex +\d+ +billing/gm)?.length, 5);
  assert.match(table.stdout, /tenant acme: 3 dead letters\ntenant globex: 5 dead letters/);

  const status = await tidings(['--json', 'status']);
  assert.equal(status.code, 0, status.stderr);
  const statuses = JSON.parse(status.stdout);
  assert.deepEqual(Object.keys(statuses), ['acme', 'globex']);
  const deadOf = (value: { subscriptions: Array<{ name: string; deadLetters: number }> }) =>
    value.subscriptions.find((subscription) => subscription.name === 'billing')?.deadLetters;
  assert.deepEqual([deadOf(statuses.acme), deadOf(statuses.globex)], [3, 5]);
  const human = await tidings(['status']);
  assert.equal(human.code, 0, human.stderr);
  assert.match(
    human.stdout,
    new RegExp(`== tenant acme \\(schema ${acme.schema} at postgres://[^)]*\\) ==[\\s\\S]*== tenant globex \\(schema ${globex.schema} at `),
  );

  const tenants = await tidings(['--json', 'tenants', 'list']);
  assert.equal(tenants.code, 0, tenants.stderr);
  const tenantsOf = JSON.parse(tenants.stdout);
  assert.deepEqual(
    [
      tenantsOf.acme.tenants.map((row: { tenant: string; messages: number }) => [row.tenant, row.messages]),
      tenantsOf.globex.tenants.map((row: { tenant: string; messages: number }) => [row.tenant, row.messages]),
    ],
    [[['acme', 3]], [['globex', 5]]],
  );
  const tenantsTable = await tidings(['tenants', 'list']);
  assert.match(tenantsTable.stdout, /^STAMP +TENANT +MESSAGES/m);
  assert.match(tenantsTable.stdout, /^globex +globex +5 /m);

  // --stamp narrows to one stamp, in the shape of a deployment without stamps.
  const one = await tidings(['--json', '--stamp', 'globex', 'dead-letters', 'count']);
  assert.equal(one.code, 0, one.stderr);
  assert.deepEqual(JSON.parse(one.stdout), { count: 5 });
  const oneStatus = await tidings(['--json', '--stamp', 'acme', 'status']);
  assert.equal(oneStatus.code, 0, oneStatus.stderr);
  assert.equal(deadOf(JSON.parse(oneStatus.stdout)), 3);
  const unknown = await tidings(['--stamp', 'initech', 'status']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /--stamp initech: no such stamp .*; the tenants are acme, globex/);

  // A change without --stamp is refused and changes nothing; with it, only that tenant's dead letters go.
  for (const args of [
    ['dead-letters', 'drop', '--all'],
    ['dead-letters', 'redrive', '--all'],
    ['replay', 'billing', '--from', '1'],
    ['prune', '--dry-run'],
  ]) {
    const refused = await tidings(args);
    assert.equal(refused.code, 2, `${args.join(' ')}: ${refused.stderr}`);
    assert.match(
      refused.stderr,
      new RegExp(`tidings ${args[0]}( ${args[1]})? works on one tenant, .* has stamps for acme, globex: name one with --stamp <tenant>`),
    );
  }
  assert.deepEqual(JSON.parse((await tidings(['--json', 'dead-letters', 'count'])).stdout), { acme: 3, globex: 5 }, 'nothing changed');
  const dropped = await tidings(['--stamp', 'acme', 'dead-letters', 'drop', '--all', '--actor', 'test']);
  assert.equal(dropped.code, 0, dropped.stderr);
  assert.deepEqual(JSON.parse((await tidings(['--json', 'dead-letters', 'count'])).stdout), { acme: 0, globex: 5 }, 'only acme lost its dead letters');

  // A stamp that cannot be reached: its line says why, the others print, and the exit code is 3.
  write({ acme: { schema: acme.schema }, globex: { schema: globex.schema }, initech: { url: 'postgres://postgres@127.0.0.1:1/test' } });
  const partial = await tidings(['--json', 'dead-letters', 'count']);
  assert.equal(partial.code, 3, partial.stderr);
  const partialJson = JSON.parse(partial.stdout);
  assert.deepEqual([partialJson.acme, partialJson.globex, partialJson.initech.error.code], [0, 5, 'BACKBONE_UNAVAILABLE']);
  assert.match(partialJson.initech.error.message, /Cannot reach PostgreSQL at .*127\.0\.0\.1:1/);
  assert.match(partial.stderr, /1 of 3 stamps could not be read: initech \(the reasons are shown with them\)/);
  const partialStatus = await tidings(['status']);
  assert.equal(partialStatus.code, 3);
  assert.match(partialStatus.stdout, /== tenant globex [^\n]*==\n[\s\S]*== tenant initech [^\n]*==\ncannot read: Cannot reach PostgreSQL/);
  const partialTable = await tidings(['dead-letters', 'count']);
  assert.equal(partialTable.code, 3);
  assert.match(partialTable.stdout, /^globex +5 /m);
  assert.match(partialTable.stdout, /^initech +- .*Cannot reach PostgreSQL/m);

  // A bad config file is rejected with the field named.
  write({ acme: { schema: 'Not-A-Schema' } });
  const bad = await tidings(['status']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /stamps\.acme\.schema "Not-A-Schema" is invalid/);
});
