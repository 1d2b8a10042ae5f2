/**
 * Replicas of tenants' data against a real PostgreSQL server: each row keeps its event's tenant (one key in
 * two tenants is two rows), reads are confined to the code's tenant, drift checks and rebuilds carry the
 * tenant, a tenant's handler SQL through `ctx.tx` reaches no other tenant's replica rows (row-level security),
 * a purge deletes the tenant's replica rows and nothing else, and a table made before tenants is brought up
 * to date on start.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { z } from 'zod';
import { defineEvent, type DataOf, type Message } from '../src/index.ts';
import { purgeTenant, showTenant, type PgTransaction } from '../src/postgres/index.ts';
import { bucketSql, rowHashSql } from '../src/replica/digest.ts';
import { defineReplica, defineSource, feed, replica, source, type Replica } from '../src/replica/index.ts';
import { pgWorld, type PgWorld } from './fixtures/bus.ts';
import { tidingsInProcess } from './fixtures/cli.ts';
import { Ticked } from './fixtures/contracts.ts';
import { DATABASE_URL, sql, waitFor } from './helpers.ts';
import pg from 'pg';

const AccountChanged = defineEvent('test.account-changed', {
  schema: z.object({ id: z.string(), version: z.number().int(), name: z.string() }),
  key: (account) => account.id,
});
const AccountClosed = defineEvent('test.account-closed', { schema: z.object({ id: z.string(), version: z.number().int() }), key: (a) => a.id });

type Account = DataOf<typeof AccountChanged>;

const accounts = defineReplica<Account>({
  name: 'accounts',
  source: 'test.accounts',
  feeds: [feed(AccountChanged), feed(AccountClosed, { delete: true })],
  indexes: { name: (row) => row.name },
});

const running: Replica<Account>[] = [];
after(() => {
  for (const r of running) r.stop();
});

/** The owner: accounts unique per tenant ('' for none), a tenant-aware source, and writes that publish with the row's tenant. */
async function owner(world: PgWorld, withSource = true) {
  const { schema } = world;
  const bus = world.bus('accounts');
  if (withSource) {
    source(
      bus,
      defineSource({
        name: 'test.accounts',
        tenants: true,
        select: `select id as key, nullif(tenant, '') as tenant, version, jsonb_build_object('id', id, 'version', version, 'name', name) as state from "${schema}".accounts`,
      }),
    );
  }
  await bus.start();
  await bus.transaction((tx) =>
    tx.query(`create table "${schema}".accounts (tenant text not null, id text not null, version int8 not null, name text not null, primary key (tenant, id))`),
  );
  const versions = new Map<string, number>();
  const change = (tenant: string, id: string, name: string, op: 'upsert' | 'close' = 'upsert') =>
    bus.transaction(async (tx: PgTransaction) => {
      const version = (versions.get(`${tenant}/${id}`) ?? 0) + 1;
      versions.set(`${tenant}/${id}`, version);
      const options = tenant === '' ? { tx } : { tx, tenant };
      if (op === 'close') {
        await tx.query(`delete from "${schema}".accounts where tenant = $1 and id = $2`, [tenant, id]);
        await bus.publish(AccountClosed, { id, version }, options);
      } else {
        await tx.query(
          `insert into "${schema}".accounts values ($1, $2, $3, $4) on conflict (tenant, id) do update set version = excluded.version, name = excluded.name`,
          [tenant, id, version, name],
        );
        await bus.publish(AccountChanged, { id, version, name }, options);
      }
    });
  return { bus, change };
}

const ownerRows = (schema: string) =>
  sql(`select tenant, id as key, version::text as version, jsonb_build_object('id', id, 'version', version, 'name', name) as state
       from "${schema}".accounts order by tenant, id`);
const replicaRows = (r: Replica<Account>) => sql(`select tenant, key, version::text as version, state from ${r.view} order by tenant, key`);

test('a replica keeps each row with its tenant: reads are confined to the tenant, drift checks and rebuilds compare per tenant', async (t) => {
  const world = await pgWorld(t, 'rpt');
  if (world === undefined) return;
  const { change } = await owner(world);
  await change('acme', 'a-1', 'acme one');
  await change('globex', 'a-1', 'globex one');
  await change('', 'a-2', 'no tenant');
  await change('acme', 'a-3', 'acme three');
  await change('globex', 'a-4', 'globex four');
  await change('globex', 'a-4', 'globex four', 'close');
  const gateway = world.bus('gateway');
  const table = replica(gateway, accounts, { instance: 'sql', driftCheckEveryMs: 0 });
  const memory = replica(gateway, accounts, { instance: 'mem', memory: true, driftCheckEveryMs: 0 });
  running.push(table, memory);
  await gateway.start();
  await Promise.all([table.start(), memory.start()]);
  await Promise.all([table.caughtUp(), memory.caughtUp()]);
  const expected = await ownerRows(world.schema);
  assert.deepEqual(
    expected.map((row) => `${row.tenant}/${row.key}`),
    ['/a-2', 'acme/a-1', 'acme/a-3', 'globex/a-1'],
  );
  for (const r of [table, memory]) {
    assert.deepEqual(await replicaRows(r), expected, `${r.name}: one row per tenant and key, each with its event's tenant`);
    assert.equal((await gateway.withTenant('acme', () => r.get('a-1')))?.name, 'acme one', `${r.name}: withTenant reads its tenant's row`);
    assert.equal((await r.get('a-1', { tenant: 'globex' }))?.name, 'globex one', `${r.name}: { tenant } reads that tenant's row`);
    assert.equal(await gateway.withTenant('globex', () => r.get('a-3')), undefined, `${r.name}: another tenant's key is not there for globex`);
    assert.equal(await gateway.withTenant('acme', () => r.get('a-2')), undefined, `${r.name}: nor a row of no tenant`);
    assert.equal(await r.get('a-4', { tenant: 'globex' }), undefined, `${r.name}: a closed account is gone`);
    assert.equal((await r.get('a-3'))?.name, 'acme three', `${r.name}: outside any tenant, the one tenant holding a key`);
    await assert.rejects(r.get('a-1'), { code: 'TENANT_REQUIRED', message: /key a-1 is held by tenants acme, globex.*withTenant/ });
    await assert.rejects(r.get('a-1', { tenant: "x'; drop table" }), { code: 'INVALID_TENANT' });
    assert.deepEqual(
      (await gateway.withTenant('acme', () => r.query())).map((row) => row.name),
      ['acme one', 'acme three'],
      `${r.name}: query within acme`,
    );
    assert.deepEqual(
      (await r.query("state->>'name' like $1", ['%one'], { tenant: 'globex' })).map((row) => row.name),
      ['globex one'],
      `${r.name}: query with its own parameters and a tenant`,
    );
    assert.equal((await r.query()).length, 4, `${r.name}: outside any tenant, every tenant's rows`);
  }
  assert.equal(gateway.withTenant('globex', () => memory.lookup('name', 'globex one'))?.id, 'a-1');
  assert.equal(
    gateway.withTenant('acme', () => memory.lookup('name', 'globex one')),
    undefined,
    'an index is confined too',
  );

  const equal = await table.checkDrift();
  assert.deepEqual([equal.missing, equal.extra, equal.different], [0, 0, 0], 'the digests, tenants included, agree');
  assert.deepEqual(equal.messages, { sent: 1, received: 1 });
  // Drift in one tenant's rows only: a changed row, a lost row, and a row the owner never had.
  const client = new pg.Client({ connectionString: DATABASE_URL });
  await client.connect();
  t.after(() => client.end());
  await client.query(`update ${table.view} set state = jsonb_set(state, '{name}', '"edited"') where tenant = 'acme' and key = 'a-1'`);
  await client.query(`delete from ${table.view} where tenant = 'globex' and key = 'a-1'`);
  await client.query(
    `insert into "${world.schema}".replica_accounts_sql_g1 (tenant, key, version, state) values ('globex', 'a-3', 1, '{"id":"a-3","version":1,"name":"stray"}')`,
  );
  const drift = await table.checkDrift();
  assert.deepEqual([drift.missing, drift.extra, drift.different, drift.repaired], [1, 1, 1, 3], JSON.stringify(drift.samples));
  assert.deepEqual(drift.samples, { missing: ['globex/a-1'], extra: ['globex/a-3'], different: ['acme/a-1'] });
  assert.deepEqual(await replicaRows(table), expected, 'repaired per tenant: acme a-3 untouched by the stray globex a-3');

  const rebuilt = await memory.rebuild();
  assert.equal(rebuilt.rows, 4);
  assert.deepEqual(await replicaRows(memory), expected, 'a state transfer carries every row with its tenant');
  assert.equal((await memory.get('a-1', { tenant: 'acme' }))?.name, 'acme one', 'memory reloaded per tenant');
  await change('acme', 'a-1', 'acme renamed');
  await memory.caughtUp();
  assert.equal((await memory.get('a-1', { tenant: 'acme' }))?.name, 'acme renamed');
  assert.equal((await memory.get('a-1', { tenant: 'globex' }))?.name, 'globex one', "acme's event leaves globex's row of the same key alone");
});

test("row-level security: a tenant's handler SQL through ctx.tx reads and writes its tenant's replica rows only", async (t) => {
  const world = await pgWorld(t, 'rptls', { tenancy: { isolation: 'rls' } });
  if (world === undefined) return;
  const { change } = await owner(world);
  // The source's select runs in its handler's transaction, as the restricted role.
  await sql(`grant select on "${world.schema}".accounts to tidings_tenant`);
  const gateway = world.bus('gateway');
  const r = replica(gateway, accounts, { driftCheckEveryMs: 0 });
  running.push(r);
  const table = `"${world.schema}".replica_accounts_g1`;
  const findings = new Map<string, Record<string, unknown>>();
  gateway.subscribe(
    'probe',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      const tx = ctx.tx;
      const attempt = async (text: string, params: unknown[] = []) => {
        await tx.query('savepoint probe');
        try {
          const result = await tx.query<Record<string, unknown>>(text, params);
          await tx.query('release savepoint probe');
          return { rows: result.rows, count: result.rowCount ?? 0 };
        } catch (error) {
          await tx.query('rollback to savepoint probe');
          return { rows: [], count: 0, error: (error as Error).message };
        }
      };
      const other = message.tenant === 'acme' ? 'globex' : 'acme';
      const seen = async () =>
        (await attempt(`select distinct tenant from ${table} union select distinct tenant from ${r.view} order by 1`)).rows.map((row) => row.tenant);
      findings.set(message.tenant ?? '', {
        seen: await seen(),
        viaGet: await r.get('a-1').then(
          (row) => row?.name,
          (error: { code?: string }) => error.code,
        ),
        updated: (await attempt(`update ${table} set state = '{"name":"hacked"}' where tenant <> $1`, [message.tenant ?? ''])).count,
        updatedView: (await attempt(`update ${r.view} set state = '{"name":"hacked"}' where tenant <> $1`, [message.tenant ?? ''])).count,
        deleted: (await attempt(`delete from ${table} where tenant <> $1`, [message.tenant ?? ''])).count,
        inserted: (await attempt(`insert into ${table} (tenant, key, version, state) values ($1, 'planted', 1, '{}')`, [other])).error,
        insertedView: (await attempt(`insert into ${r.view} (tenant, key, version, state) values ($1, 'planted', 1, '{}')`, [other])).error,
        applied: (await attempt(`select "${world.schema}".replica_accounts_apply_g1($1, 'planted', 99, '{}', null, null)`, [other])).error,
        forged: (await attempt(`select set_config('tidings.scope', $1, true)`, [`t:${other}`])).error ?? (await seen()),
        dropped: (await attempt(`alter table ${table} disable row level security`)).error,
      });
    },
    { partitions: 1, batchSize: 1 },
  );
  await gateway.start();
  await r.start();
  await change('acme', 'a-1', 'acme one');
  await change('globex', 'a-1', 'globex one');
  await change('', 'a-2', 'no tenant');
  await r.caughtUp();
  assert.equal((await sql(`select count(*)::int as n from ${r.view}`))[0].n, 3, "the feed wrote each tenant's row through row-level security");
  await gateway.publish(Ticked, { key: 'p', seq: 1 }, { tenant: 'acme' });
  await gateway.publish(Ticked, { key: 'p', seq: 2 }, { tenant: 'globex' });
  await gateway.publish(Ticked, { key: 'p', seq: 3 });
  await waitFor('three probes', () => findings.size === 3);
  for (const [tenant, found] of findings) {
    assert.deepEqual(found.seen, [tenant], `${tenant || '(none)'}: sees its own replica rows only, through the table and the view`);
    // A handler of a message of no tenant reads outside any tenant's scope: a-1 is held by two tenants.
    assert.equal(
      found.viaGet,
      tenant === 'acme' ? 'acme one' : tenant === 'globex' ? 'globex one' : 'TENANT_REQUIRED',
      `${tenant}: get reads its tenant's row`,
    );
    assert.deepEqual([found.updated, found.updatedView, found.deleted], [0, 0, 0], `${tenant}: updates and deletes none of the others'`);
    assert.match(String(found.inserted), /row-level security/, `${tenant}: cannot write a row for another tenant`);
    assert.match(String(found.insertedView), /row-level security/, `${tenant}: nor through the view`);
    assert.match(String(found.applied), /row-level security/, `${tenant}: nor through the apply function`);
    assert.deepEqual(found.forged, [], `${tenant}: a forged scope sees nothing`);
    assert.match(String(found.dropped), /must be owner/, `${tenant}: cannot disable row-level security`);
  }
  assert.deepEqual(
    (await sql(`select tenant, state->>'name' as name from ${table} order by tenant, key`)).map((row) => `${row.tenant}:${row.name}`),
    [':no tenant', 'acme:acme one', 'globex:globex one'],
    'nothing changed',
  );
  // A role granted the view (a report, say) reads it with its own rights, every tenant's rows: a rebuild's
  // table is granted to it too (so is the current one when a replica starts).
  const reader = `${world.schema}_reader`;
  await sql(`create role "${reader}"`);
  t.after(() => sql(`drop owned by "${reader}"; drop role "${reader}"`));
  await sql(`grant usage on schema "${world.schema}" to "${reader}"; grant select on ${r.view} to "${reader}"`);
  const readerCount = async () => {
    const client = new pg.Client({ connectionString: DATABASE_URL });
    await client.connect();
    try {
      await client.query(`set role "${reader}"`);
      return Number((await client.query(`select count(*) as n from ${r.view}`)).rows[0].n);
    } finally {
      await client.end();
    }
  };
  // A drift check and a rebuild under isolation: the source answers for every tenant (a cross-tenant subscription).
  await sql(`update ${table} set state = '{"name":"drifted"}' where tenant = 'globex'`);
  const drift = await r.checkDrift();
  assert.deepEqual([drift.different, drift.repaired], [1, 1]);
  assert.equal((await r.rebuild()).rows, 3);
  assert.equal(await readerCount(), 3, 'the reader granted the view reads the rebuilt table through it');
  assert.equal((await r.get('a-1', { tenant: 'globex' }))?.name, 'globex one');
  await change('globex', 'a-1', 'globex renamed');
  await waitFor(
    'the event applied to the rebuilt table (granted to the restricted role)',
    async () => (await r.get('a-1', { tenant: 'globex' }))?.name === 'globex renamed',
  );
});

test("a purge deletes the tenant's rows from every replica table, and nothing of the others; the dry run counts them", async (t) => {
  const world = await pgWorld(t, 'rptp');
  if (world === undefined) return;
  const { bus, change } = await owner(world, false);
  const gateway = world.bus('gateway');
  const one = replica(gateway, accounts, { instance: 'one', driftCheckEveryMs: 0 });
  const two = replica(gateway, accounts, { instance: 'two', driftCheckEveryMs: 0 });
  running.push(one, two);
  await gateway.start();
  await Promise.all([one.start(), two.start()]);
  for (let i = 0; i < 5; i++) {
    await change('acme', `a-${i}`, `acme ${i}`);
    await change('globex', `a-${i}`, `globex ${i}`);
    if (i < 2) await change('', `a-${i}`, `none ${i}`);
  }
  await change('acme', 'a-4', 'closed', 'close'); // a tombstone is the tenant's row too
  await Promise.all([one.caughtUp(), two.caughtUp()]);
  const perTenant = async (table: string) =>
    Object.fromEntries(
      (await sql(`select tenant, count(*)::int as n from "${world.schema}".${table} group by tenant order by tenant`)).map((row) => [row.tenant, row.n]),
    );
  const tables = ['replica_accounts_one_g1', 'replica_accounts_two_g1'];
  for (const table of tables) assert.deepEqual(await perTenant(table), { '': 2, acme: 5, globex: 5 });
  const driver = (bus.backbone as unknown as { driver: Parameters<typeof purgeTenant>[0] }).driver;
  const printed = await tidingsInProcess(world.schema)('tenants', 'purge', 'acme', '--dry-run');
  assert.match(printed, /replica_accounts_one_g1 +5\n/, printed);
  assert.match(printed, /replica_accounts_two_g1 +5\n/);
  const shown = await showTenant(driver, { schema: world.schema, tenant: 'acme' });
  assert.equal(Object.keys(shown.replicas).length, 2, JSON.stringify(shown.replicas));
  assert.deepEqual(Object.values(shown.replicas), [5, 5], "the usage counts the tenant's rows of each replica");
  assert.match(await tidingsInProcess(world.schema)('tenants', 'show', 'acme'), /replica +5 rows in .*one/);
  const dry = await purgeTenant(driver, { schema: world.schema, tenant: 'acme', dryRun: true, actor: 'test' });
  assert.equal(dry.rows.replica_accounts_one_g1, 5);
  assert.equal(dry.rows.replica_accounts_two_g1, 5);
  for (const table of tables) assert.deepEqual(await perTenant(table), { '': 2, acme: 5, globex: 5 }, 'a dry run deletes nothing');
  const purged = await purgeTenant(driver, { schema: world.schema, tenant: 'acme', actor: 'test' });
  assert.deepEqual([purged.rows.replica_accounts_one_g1, purged.rows.replica_accounts_two_g1], [5, 5]);
  for (const table of tables) assert.deepEqual(await perTenant(table), { '': 2, globex: 5 }, `${table}: no row of acme, the others' all there`);
  assert.deepEqual(Object.values((await showTenant(driver, { schema: world.schema, tenant: 'acme' })).replicas), [0, 0]);
  assert.deepEqual(Object.values((await showTenant(driver, { schema: world.schema, tenant: 'globex' })).replicas), [5, 5]);
  assert.equal(await two.get('a-1', { tenant: 'acme' }), undefined);
  assert.equal((await two.get('a-1', { tenant: 'globex' }))?.name, 'globex 1');
  const [audit] = await sql(`select detail from "${world.schema}".tenant_actions where action = 'purge'`);
  assert.equal(audit.detail.rows.replica_accounts_one_g1, 5, 'the audit row names the replica tables');
});

test('a replica table made before tenants gets its tenant column on start, once, keeping its rows and their digests', async (t) => {
  const world = await pgWorld(t, 'rptm');
  if (world === undefined) return;
  const { change } = await owner(world, false);
  const s = `"${world.schema}"`;
  // The table and meta row as the previous version made them.
  await sql(`insert into ${s}.replicas (name, source) values ('accounts', 'test.accounts')`);
  await sql(`create table ${s}.replica_accounts_g1 (
      key text primary key, version int8 not null, state jsonb, event_time timestamptz, updated_at timestamptz not null default now(),
      bucket int not null generated always as (${bucketSql('key')}) stored,
      hash int8 generated always as (case when state is null then null else ${rowHashSql('key', 'version', 'state')} end) stored)`);
  await sql(`create index replica_accounts_g1_bucket on ${s}.replica_accounts_g1 (bucket)`);
  await sql(`create view ${s}.replica_accounts as select key, version, state, event_time, updated_at from ${s}.replica_accounts_g1 where state is not null`);
  await sql(
    `insert into ${s}.replica_accounts_g1 (key, version, state) select 'k-' || i, 1, jsonb_build_object('id', 'k-' || i, 'version', 1, 'name', 'old') from generate_series(1, 50) i`,
  );
  const before = await sql(`select key, bucket, hash::text as hash from ${s}.replica_accounts_g1 order by key`);
  for (let start = 0; start < 2; start++) {
    const gateway = world.bus(`gateway-${start}`);
    const r = replica(gateway, accounts, { driftCheckEveryMs: 0 });
    running.push(r);
    await gateway.start();
    await r.start();
    await change('acme', 'k-1', `acme ${start}`);
    await r.caughtUp();
    await gateway.stop();
  }
  assert.deepEqual(
    await sql(`select key, bucket, hash::text as hash from ${s}.replica_accounts_g1 where tenant = '' order by key`),
    before,
    'rows of no tenant keep their bucket and hash (an older source still agrees)',
  );
  const [pk] = await sql(`select pg_get_constraintdef(oid) as def from pg_constraint where conrelid = '${s}.replica_accounts_g1'::regclass and contype = 'p'`);
  assert.equal(pk.def, 'PRIMARY KEY (key, tenant)');
  assert.deepEqual(
    (await sql(`select tenant, state->>'name' as name from ${s}.replica_accounts where key = 'k-1' order by tenant`)).map((row) => `${row.tenant}:${row.name}`),
    [':old', 'acme:acme 1'],
    "acme's event is a row of its own beside the old row of the same key",
  );
});
