/**
 * Tenants' lifecycle on PostgreSQL (src/postgres/ops/tenants.ts): suspend one tenant under load (its
 * messages wait, the others flow, nothing is lost, each key's order holds after resume), purge one (no row
 * of it left, table by table, nothing of the others touched, an audit row), export one, and its usage.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { deadLetter } from '../src/index.ts';
import { exportTenant, listTenants, purgeTenant, resumeTenant, showTenant, suspendTenant, type PostgresBackbone } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { connect, DATABASE_URL, runTidings, sleep, waitFor } from './helpers.ts';

const actor = 'test@host';

test('suspend and resume under load: the suspended tenant waits, the others flow, nothing is lost, each key in order', async (t) => {
  const world = await pgWorld(t, 'tsus');
  if (world === undefined) return;
  const bus = world.bus();
  const handled = new Map<string, number[]>();
  bus.subscribe(
    'work',
    Ticked,
    (message) => {
      const at = `${message.tenant}/${message.key}`;
      handled.set(at, [...(handled.get(at) ?? []), message.data.seq]);
    },
    { partitions: 3, batchSize: 50 },
  );
  await bus.start();
  const driver = (bus.backbone as PostgresBackbone).driver;
  const schema = world.schema;
  assert.deepEqual(await suspendTenant(driver, { schema, tenant: 'acme', actor, reason: 'unpaid' }), { suspended: true });
  assert.deepEqual(await suspendTenant(driver, { schema, tenant: 'acme', actor }), { suspended: false }, 'a second suspend changes nothing');
  await sleep(200); // the signal reaches the worker
  const tenants = ['acme', 'globex', 'initech'];
  const publishing = (async () => {
    for (let seq = 1; seq <= 40; seq++) {
      await Promise.all(tenants.flatMap((tenant) => ['k1', 'k2'].map((key) => bus.publish(Ticked, { key: `${tenant}-${key}`, seq }, { tenant }))));
    }
  })();
  await publishing;
  const count = (tenant: string) => [...handled].filter(([at]) => at.startsWith(`${tenant}/`)).reduce((sum, [, seqs]) => sum + seqs.length, 0);
  await waitFor('the others', () => count('globex') === 80 && count('initech') === 80);
  await sleep(300);
  assert.equal(count('acme'), 0, 'nothing of the suspended tenant was handled');
  const usage = await showTenant(driver, { schema, tenant: 'acme' });
  assert.equal(usage.held, 80, 'its messages wait in held');
  assert.ok(usage.suspendedAt !== undefined && usage.reason === 'unpaid');

  const resumed = await resumeTenant(driver, { schema, tenant: 'acme', actor });
  assert.equal(resumed.resumed, true);
  assert.equal(resumed.released, 2, 'one head per key was made due');
  await waitFor('the suspended tenant catching up', () => count('acme') === 80);
  await sleep(200);
  for (const [at, seqs] of handled) {
    assert.deepEqual(
      seqs,
      Array.from({ length: 40 }, (_, i) => i + 1),
      `${at}: each once, in order`,
    );
  }
  const after = await showTenant(driver, { schema, tenant: 'acme' });
  assert.equal(after.held, 0);
  assert.equal(after.handled.work, 80);
  assert.deepEqual(
    after.actions.map((action) => action.action),
    ['resume', 'suspend'],
  );
});

test('purge: no row of the tenant is left, table by table; the other tenants keep every row; a dry run deletes nothing; an audit row; export and usage', async (t) => {
  // Under isolation, so the rows handlers write (replies here) carry their tenant.
  const world = await pgWorld(t, 'tpur', { tenancy: { isolation: 'rls' } });
  if (world === undefined) return;
  const bus = world.bus();
  bus.subscribe(
    'work',
    Ticked,
    async (message, ctx) => {
      await ctx.tx.query(`insert into "${world.schema}".replies (request_id, data) values ($1, '{}')`, [`r-${message.id}`]);
      if (message.data.note === 'refuse') return deadLetter('refused');
      if (message.data.note === 'retry') throw new Error('later');
      return undefined;
    },
    { partitions: 1, retry: { immediate: 0, delayed: [60_000], jitter: 0 } },
  );
  await bus.start();
  const driver = (bus.backbone as PostgresBackbone).driver;
  const schema = world.schema;
  for (const tenant of ['acme', 'globex']) {
    for (let seq = 1; seq <= 5; seq++) await bus.publish(Ticked, { key: `${tenant}-a`, seq }, { tenant });
    await bus.publish(Ticked, { key: `${tenant}-d`, seq: 6, note: 'refuse' }, { tenant });
    await bus.publish(Ticked, { key: `${tenant}-r`, seq: 7, note: 'retry' }, { tenant });
    await bus.publish(Ticked, { key: `${tenant}-r`, seq: 8 }, { tenant }); // waits behind 7 in held
    await bus.publish(Ticked, { key: `${tenant}-s`, seq: 9 }, { tenant, delayMs: 600_000 });
  }
  const s = `"${schema}"`;
  const client = await connect();
  t.after(() => client.end());
  const perTable = async (tenant: string) => {
    const one = async (sql: string) => Number((await client.query(sql, [tenant])).rows[0].n);
    return {
      log: await one(`select count(*) as n from ${s}.log where tenant = $1`),
      inbox: await one(`select count(*) as n from ${s}.inbox i join ${s}.log l on l.id = i.message_id where l.tenant = $1`),
      held: await one(`select count(*) as n from ${s}.held h join ${s}.log l on l.position = h.position where l.tenant = $1`),
      dead_letters: await one(`select count(*) as n from ${s}.dead_letters where envelope->>'tenant' = $1`),
      scheduled: await one(`select count(*) as n from ${s}.scheduled where tenant = $1`),
      replies: await one(`select count(*) as n from ${s}.replies where tenant = $1`),
    };
  };
  // Handled: 5 (a reply each); 6 dead-lettered and 7 failed (their replies rolled back), 8 held behind 7.
  await waitFor('everything settled', async () => {
    const [acme, globex] = [await perTable('acme'), await perTable('globex')];
    return acme.inbox === 5 && acme.held === 2 && acme.dead_letters === 1 && globex.inbox === 5 && globex.held === 2 && globex.dead_letters === 1;
  });
  const before = { acme: await perTable('acme'), globex: await perTable('globex') };
  assert.deepEqual(before.acme, { log: 8, inbox: 5, held: 2, dead_letters: 1, scheduled: 1, replies: 5 });

  const listed = await listTenants(driver, { schema });
  assert.deepEqual(
    listed.map((tenant) => `${tenant.tenant}:${tenant.messages}`),
    ['acme:8', 'globex:8'],
  );
  const usage = await showTenant(driver, { schema, tenant: 'acme' });
  assert.equal(usage.messages, 8);
  assert.ok(usage.bytes > 8 * 10, 'bytes of data counted');
  assert.deepEqual(usage.handled, { work: 5 });
  assert.equal(usage.deadLetters, 1);

  const lines: string[] = [];
  for await (const envelope of exportTenant(driver, { schema, tenant: 'acme', actor, chunkSize: 3 })) lines.push(JSON.stringify(envelope));
  assert.equal(lines.length, 8, 'every message of the log, chunk after chunk');
  assert.ok(
    lines.every((line) => JSON.parse(line).tenant === 'acme'),
    'only its own',
  );

  const dry = await purgeTenant(driver, { schema, tenant: 'acme', actor, dryRun: true });
  assert.equal(dry.dryRun, true);
  assert.deepEqual(dry.rows, {
    held: 2,
    inbox: 5,
    dead_letters: 1,
    scheduled: 1,
    sagas: 0,
    saga_transitions: 0,
    replies: 5,
    log: 8,
    tenants: 0,
    tenant_quotas: 0,
  });
  assert.deepEqual(await perTable('acme'), before.acme, 'a dry run deletes nothing');

  const purged = await purgeTenant(driver, { schema, tenant: 'acme', actor });
  assert.deepEqual(purged.rows, dry.rows, 'it deleted what the dry run counted');
  assert.deepEqual(await perTable('acme'), { log: 0, inbox: 0, held: 0, dead_letters: 0, scheduled: 0, replies: 0 }, 'no row of it is left');
  assert.deepEqual(await perTable('globex'), before.globex, 'the other tenant keeps every row');
  const { rows: audit } = await client.query(`select action, actor, detail from ${s}.tenant_actions where tenant = 'acme' order by id`);
  assert.deepEqual(
    audit.map((row) => row.action),
    ['export', 'purge'],
  );
  assert.equal(audit[1].actor, actor);
  assert.equal(audit[1].detail.rows.log, 8, 'the audit row says what was deleted');
  await assert.rejects(purgeTenant(driver, { schema, tenant: "acme'--", actor }), /INVALID_TENANT|not a tenant id/);
});

test('tidings tenants list|show|suspend|resume|purge|export: what an operator runs', async (t) => {
  const world = await pgWorld(t, 'tcli');
  if (world === undefined) return;
  const bus = world.bus();
  await bus.start();
  for (const tenant of ['acme', 'globex']) for (let seq = 1; seq <= 3; seq++) await bus.publish(Ticked, { key: tenant, seq }, { tenant });
  const env = { ...process.env, DATABASE_URL };
  const run = (...args: string[]) => runTidings(['--schema', world.schema, ...args], env);
  const json = async (...args: string[]) => {
    const result = await run('--json', ...args);
    assert.equal(result.code, 0, `tidings ${args.join(' ')}: ${result.stderr}`);
    return JSON.parse(result.stdout);
  };
  assert.deepEqual(
    (await json('tenants', 'list')).tenants.map((row: { tenant: string; messages: number }) => `${row.tenant}:${row.messages}`),
    ['acme:3', 'globex:3'],
  );
  const suspended = await run('tenants', 'suspend', 'acme', '--reason', 'unpaid', '--actor', 'ops');
  assert.equal(suspended.code, 0, suspended.stderr);
  assert.match(suspended.stdout, /Suspended acme/);
  const shown = await json('tenants', 'show', 'acme');
  assert.equal(shown.messages, 3);
  assert.equal(shown.reason, 'unpaid');
  assert.equal(shown.suspendedBy, 'ops');
  assert.match((await run('tenants', 'resume', 'acme')).stdout, /Resumed acme/);
  assert.equal((await run('tenants', 'resume', 'acme')).code, 1, 'resuming a tenant not suspended fails, saying so');
  const refused = await run('tenants', 'purge', 'acme');
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /--dry-run.*--yes/);
  assert.equal((await json('tenants', 'purge', 'acme', '--dry-run')).rows.log, 3);
  const file = join(mkdtempSync(join(tmpdir(), 'tidings-export-')), 'acme.ndjson');
  const exported = await run('tenants', 'export', 'acme', '--out', file);
  assert.equal(exported.code, 0, exported.stderr);
  const lines = readFileSync(file, 'utf8').trim().split('\n');
  assert.deepEqual(
    lines.map((line) => JSON.parse(line).data.seq),
    [1, 2, 3],
  );
  assert.equal((await json('tenants', 'purge', 'acme', '--yes')).rows.log, 3);
  assert.deepEqual(
    (await json('tenants', 'list')).tenants.map((row: { tenant: string }) => row.tenant),
    ['globex'],
  );
  const hostile = await run('tenants', 'show', "acme'; drop table log; --");
  assert.notEqual(hostile.code, 0);
  assert.match(hostile.stderr, /not a tenant id/);
});
