/**
 * A replica on a backbone per tenant (tidings/stamps) against real PostgreSQL: one replica per stamp, its
 * tables in the stamp's schema (or database), filled by the feed handled there; reads go to the tenant's
 * stamp and never see another tenant's rows; a drift check and a rebuild in one stamp touch only that stamp;
 * a stamp added at run time has its replica's tables before its first event, a stamp removed stops it, and
 * a stamp that is down holds up its own tenant only. Rows are counted per schema.
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import { z } from 'zod';
import { createBus, defineEvent, type Bus, type DataOf, type TidingsError } from '../src/index.ts';
import { memory } from '../src/memory/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { defineReplica, defineSource, feed, replica, requestDriftCheck, source, StampReplicas, type Replica } from '../src/replica/index.ts';
import { tenantStamps, type TenantStamps } from '../src/stamps/index.ts';
import { quickPostgres } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { ensureDatabase, onDatabase, testDatabase, urlOf } from './fixtures/databases.ts';
import { DATABASE_URL, requirePostgres, uniqueSchema, waitFor } from './helpers.ts';

const AccountChanged = defineEvent('test.stamp-account-changed', {
  schema: z.object({ id: z.string(), version: z.number().int(), name: z.string() }),
  key: (account) => account.id,
});
const AccountClosed = defineEvent('test.stamp-account-closed', { schema: z.object({ id: z.string(), version: z.number().int() }), key: (a) => a.id });

type Account = DataOf<typeof AccountChanged>;

const accounts = defineReplica<Account>({
  name: 'accounts',
  source: 'test.stamp-accounts',
  feeds: [feed(AccountChanged), feed(AccountClosed, { delete: true })],
  indexes: { name: (row) => row.name },
});

interface Place {
  readonly database: string;
  readonly schema: string;
}

/**
 * Tenants' stamps at their places, shared by an owner service and a gateway (one log per stamp, as two
 * services of one deployment share it). The owner's connections find its own table, `accounts`, in the
 * stamp's schema through search_path: its source's one `select` then reads each stamp's own data.
 */
function deployment(t: TestContext, places: Record<string, Place>, initial: string[]) {
  const buses: Bus<PgTransaction>[] = [];
  const replicas: Replica<Account>[] = [];
  const warnings: string[] = [];
  t.after(async () => {
    for (const r of replicas) r.stop();
    for (const bus of buses) await bus.stop().catch(() => undefined);
    for (const { database, schema } of Object.values(places)) {
      await onDatabase(database, (client) => client.query(`drop schema if exists "${schema}" cascade`)).catch(() => undefined);
    }
  });
  const stamps = (owner: boolean): TenantStamps<PgTransaction> =>
    tenantStamps({
      tenants: initial,
      reopenMs: 200,
      onWarning: (message) => warnings.push(message),
      backbone: (tenant) => {
        const { database, schema } = places[tenant]!;
        const url = new URL(urlOf(database));
        if (owner) url.searchParams.set('options', `-c search_path=${schema}`);
        return postgres({ ...quickPostgres, poolSize: 3, url: url.toString(), schema });
      },
    });
  const bus = (service: string, owner = false) => {
    const backbone = stamps(owner);
    const made = createBus({ service, backbone });
    buses.push(made);
    return { bus: made, stamps: backbone };
  };
  return { bus, replicas, warnings };
}

/** The owner's table in a stamp's schema (made before the stamp is used). */
async function accountsTable({ database, schema }: Place): Promise<void> {
  await onDatabase(database, async (client) => {
    await client.query(`create schema if not exists "${schema}"`);
    await client.query(`create table "${schema}".accounts (id text primary key, tenant text not null, version int8 not null, name text not null)`);
  });
}

/** The owner: its source, and changes written to its table and published in one transaction of the tenant's stamp. */
async function owner(world: ReturnType<typeof deployment>) {
  const { bus, stamps } = world.bus('accounts', true);
  source(
    bus,
    defineSource({
      name: 'test.stamp-accounts',
      tenants: true,
      select: `select id as key, tenant, version, jsonb_build_object('id', id, 'version', version, 'name', name) as state from accounts`,
    }),
  );
  await bus.start();
  const versions = new Map<string, number>();
  const change = (tenant: string, id: string, name: string, op: 'upsert' | 'close' = 'upsert') =>
    bus.withTenant(tenant, () =>
      bus.transaction(async (tx) => {
        const version = (versions.get(`${tenant}/${id}`) ?? 0) + 1;
        versions.set(`${tenant}/${id}`, version);
        if (op === 'close') {
          await tx.query('delete from accounts where id = $1', [id]);
          await bus.publish(AccountClosed, { id, version }, { tx });
        } else {
          await tx.query('insert into accounts values ($1, $2, $3, $4) on conflict (id) do update set version = excluded.version, name = excluded.name', [
            id,
            tenant,
            version,
            name,
          ]);
          await bus.publish(AccountChanged, { id, version, name }, { tx });
        }
      }),
    );
  return { bus, stamps, change };
}

/** The replica's live rows in a stamp's schema, as tenant/key:name. */
const rowsIn = ({ database, schema }: Place) =>
  onDatabase(database, async (client) =>
    (await client.query(`select tenant, key, state->>'name' as name from "${schema}".replica_accounts order by key`)).rows.map(
      (row) => `${row.tenant}/${row.key}:${row.name}`,
    ),
  );

test('one replica per stamp: rows in their own stamp only, reads by tenant, drift checks and rebuilds per stamp, stamps added and removed', async (t) => {
  if (!(await requirePostgres(t))) return;
  await ensureDatabase('tidings_stamp_b');
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('rsa') },
    globex: { database: testDatabase, schema: uniqueSchema('rsg') },
    initech: { database: 'tidings_stamp_b', schema: uniqueSchema('rsi') },
  };
  for (const place of Object.values(places)) await accountsTable(place);
  const world = deployment(t, places, ['acme', 'globex']);
  const { stamps: ownerStamps, change } = await owner(world);
  await change('acme', 'a-1', 'acme one');
  await change('globex', 'a-1', 'globex one');
  await change('acme', 'a-2', 'acme two');
  await change('globex', 'g-3', 'globex three');
  await change('globex', 'g-4', 'globex four');
  await change('globex', 'g-4', 'globex four', 'close');

  const { bus: gateway, stamps } = world.bus('gateway');
  const r = replica(gateway, accounts, { memory: true, driftCheckEveryMs: 0 });
  world.replicas.push(r);
  assert.ok(r instanceof StampReplicas);
  // A handler reads its message's tenant's replica.
  const probed = new Map<string, string | undefined>();
  gateway.subscribe('probe', Ticked, async (message) => {
    probed.set(message.tenant!, (await r.get('a-1'))?.name);
  });
  await gateway.start();
  await r.start();
  await r.caughtUp();

  assert.deepEqual(await rowsIn(places.acme!), ['acme/a-1:acme one', 'acme/a-2:acme two'], "acme's stamp holds acme's rows only");
  assert.deepEqual(await rowsIn(places.globex!), ['globex/a-1:globex one', 'globex/g-3:globex three'], "globex's stamp holds globex's rows only");
  assert.deepEqual(r.tenants(), ['acme', 'globex']);
  assert.equal(r.stamp('acme').schema, places.acme!.schema);

  // Reads go to the tenant's stamp, and see nothing of another tenant's.
  assert.equal((await gateway.withTenant('acme', () => r.get('a-1')))?.name, 'acme one');
  assert.equal((await r.get('a-1', { tenant: 'globex' }))?.name, 'globex one');
  assert.equal(await gateway.withTenant('acme', () => r.get('g-3')), undefined, "globex's key is not in acme's replica");
  assert.equal(await r.get('g-4', { tenant: 'globex' }), undefined, 'a closed account is gone');
  assert.deepEqual(
    (await gateway.withTenant('globex', () => r.query())).map((row) => row.name),
    ['globex one', 'globex three'],
  );
  assert.deepEqual(
    (await r.query("state->>'name' like $1", ['%two'], { tenant: 'acme' })).map((row) => row.id),
    ['a-2'],
  );
  assert.equal(gateway.withTenant('globex', () => r.lookup('name', 'globex three'))?.id, 'g-3');
  assert.equal(r.lookup('name', 'acme two', { tenant: 'globex' }), undefined, 'a memory index is its stamp');
  assert.equal(
    gateway.withTenant('acme', () => r.view),
    `"${places.acme!.schema}"."replica_accounts"`,
  );
  await gateway.publish(Ticked, { key: 'p', seq: 1 }, { tenant: 'acme' });
  await gateway.publish(Ticked, { key: 'p', seq: 2 }, { tenant: 'globex' });
  await waitFor('the probes', () => probed.size === 2);
  assert.deepEqual(Object.fromEntries(probed), { acme: 'acme one', globex: 'globex one' }, "a handler reads its message's tenant's rows");

  // Without a tenant, or for a tenant with no stamp: a clear error.
  await assert.rejects(r.get('a-1'), (error: TidingsError) => {
    assert.equal(error.code, 'TENANT_REQUIRED');
    assert.match(error.message, /Replica accounts: get\("a-1"\) needs a tenant: on a backbone per tenant .*bus\.withTenant\(tenant, fn\).*\{ tenant \}/);
    return true;
  });
  await assert.rejects(r.query(), { code: 'TENANT_REQUIRED' });
  assert.throws(() => r.lookup('name', 'acme one'), { code: 'TENANT_REQUIRED' });
  assert.throws(() => r.view, { code: 'TENANT_REQUIRED' });
  await assert.rejects(r.get('a-1', { tenant: 'umbrella' }), (error: TidingsError) => {
    assert.equal(error.code, 'TENANT_UNKNOWN');
    assert.match(error.message, /tenant umbrella has no stamp \(the stamps are acme, globex\)\. Add it with backbone\.addTenant\('umbrella'\)/);
    return true;
  });

  // What sums up covers every stamp, and says which tenant where it is per stamp.
  assert.equal(r.stats().applied, 6);
  assert.deepEqual(
    Object.entries(r.statsByTenant()).map(([tenant, stats]) => `${tenant}:${stats.applied}:${stats.memoryRows}`),
    ['acme:2:2', 'globex:4:3'],
  );
  assert.equal((await r.staleness()).lag, 0);
  assert.deepEqual(Object.keys(await r.stalenessByTenant()), ['acme', 'globex']);

  // Drift in both stamps; a check in acme's repairs acme's only.
  await onDatabase(testDatabase, async (client) => {
    await client.query(`update "${places.acme!.schema}".replica_accounts set state = jsonb_set(state, '{name}', '"edited"') where key = 'a-1'`);
    await client.query(`delete from "${places.globex!.schema}".replica_accounts where key = 'a-1'`);
  });
  const acmeCheck = await r.checkDrift({ tenant: 'acme' });
  assert.equal(acmeCheck.tenant, 'acme');
  assert.deepEqual([acmeCheck.missing, acmeCheck.extra, acmeCheck.different, acmeCheck.repaired], [0, 0, 1, 1]);
  assert.deepEqual(acmeCheck.samples.different, ['acme/a-1']);
  assert.deepEqual(await rowsIn(places.acme!), ['acme/a-1:acme one', 'acme/a-2:acme two'], "acme's replica repaired");
  assert.deepEqual(await rowsIn(places.globex!), ['globex/g-3:globex three'], "globex's replica untouched by acme's check");
  // A check outside any tenant runs in every stamp, under one id, each stamp's report by tenant.
  const all = await r.checkDrift();
  assert.deepEqual([all.missing, all.different, all.repaired], [1, 0, 1]);
  assert.deepEqual(all.samples.missing, ['globex/a-1']);
  assert.deepEqual(
    Object.entries(all.byTenant ?? {}).map(([tenant, report]) => `${tenant}:${report.tenant}:${report.repaired}:${report.checkId === all.checkId}`),
    ['acme:acme:0:true', 'globex:globex:1:true'],
  );
  assert.deepEqual(await rowsIn(places.globex!), ['globex/a-1:globex one', 'globex/g-3:globex three']);
  assert.equal(r.stats().lastCheck?.checkId, all.checkId);
  // From outside (what `tidings drift check --stamp acme` calls): a tenant-less command in acme's stamp runs in acme's replica.
  const viaBus = await onDatabase(testDatabase, (db) =>
    requestDriftCheck({ url: DATABASE_URL, schema: places.acme!.schema, replica: 'accounts', db, timeoutMs: 30_000 }),
  );
  assert.deepEqual([viaBus.tenant, viaBus.different, viaBus.missing], ['acme', 0, 0]);

  // A rebuild of globex's stamp: a new generation there, acme's table as it was.
  const generation = async ({ database, schema }: Place) =>
    onDatabase(database, async (client) =>
      Number((await client.query(`select generation from "${schema}".replicas where name = 'accounts'`)).rows[0].generation),
    );
  const rebuilt = await gateway.withTenant('globex', () => r.rebuild());
  assert.deepEqual([rebuilt.tenant, rebuilt.rows, rebuilt.generation], ['globex', 2, 2]);
  assert.deepEqual([await generation(places.acme!), await generation(places.globex!)], [1, 2]);
  assert.equal((await r.get('g-3', { tenant: 'globex' }))?.name, 'globex three', 'memory reloaded from the new generation');

  // A tenant added at run time: its stamp has the replica's tables before anything happens there.
  await ownerStamps.addTenant('initech');
  await stamps.addTenant('initech');
  assert.deepEqual(await rowsIn(places.initech!), [], "initech's replica is there, empty, once addTenant resolved");
  await change('initech', 'a-1', 'initech one');
  await change('initech', 'i-2', 'initech two');
  await r.caughtUp();
  assert.deepEqual(await rowsIn(places.initech!), ['initech/a-1:initech one', 'initech/i-2:initech two'], 'in its own database');
  assert.equal((await r.get('a-1', { tenant: 'initech' }))?.name, 'initech one');
  assert.deepEqual(await rowsIn(places.acme!), ['acme/a-1:acme one', 'acme/a-2:acme two'], 'nothing of initech elsewhere');
  const initechCheck = await r.checkDrift({ tenant: 'initech' });
  assert.deepEqual([initechCheck.tenant, initechCheck.missing, initechCheck.different], ['initech', 0, 0], "initech's source agrees");

  // Removed: its replica stops, its reads fail as the stamps do, its events stay in its stamp unapplied.
  await stamps.removeTenant('initech');
  assert.deepEqual(r.tenants(), ['acme', 'globex']);
  await assert.rejects(r.get('a-1', { tenant: 'initech' }), { code: 'TENANT_UNKNOWN' });
  await change('initech', 'i-2', 'initech renamed');
  await waitFor('the event waiting in initech', async () => {
    const status = await ownerStamps.statusByTenant();
    return status.initech?.subscriptions.find((s) => s.name === 'replica.accounts')?.lag === 1;
  });
  assert.deepEqual(await rowsIn(places.initech!), ['initech/a-1:initech one', 'initech/i-2:initech two'], 'not applied once removed');
  await r.caughtUp();
  assert.deepEqual(Object.keys(r.statsByTenant()), ['acme', 'globex']);
});

test('a stamp that is down holds up its own tenant only; its replica is made once it opens', async (t) => {
  if (!(await requirePostgres(t))) return;
  const missing = `tidings_rstamp_${process.pid}_${Math.random().toString(36).slice(2, 6)}`;
  t.after(() => onDatabase(testDatabase, (client) => client.query(`drop database if exists "${missing}" with (force)`)));
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('rda') },
    umbrella: { database: missing, schema: uniqueSchema('rdu') },
  };
  await accountsTable(places.acme!);
  const world = deployment(t, places, ['acme', 'umbrella']);
  const { bus: gateway } = world.bus('gateway');
  const r = replica(gateway, accounts, { driftCheckEveryMs: 0 });
  world.replicas.push(r);
  assert.ok(r instanceof StampReplicas);
  await gateway.start();
  await r.start();
  const { change } = await owner(world);
  await change('acme', 'a-1', 'acme one');
  await r.caughtUp();
  assert.equal((await r.get('a-1', { tenant: 'acme' }))?.name, 'acme one');
  await assert.rejects(r.get('a-1', { tenant: 'umbrella' }), (error: TidingsError) => {
    assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
    assert.match(error.message, /stamp of tenant umbrella is unavailable/);
    return true;
  });
  assert.deepEqual(Object.keys(r.statsByTenant()), ['acme'], 'what sums up covers the open stamps');

  await onDatabase(testDatabase, (client) => client.query(`create database "${missing}"`));
  await waitFor('umbrella to open with its replica', () => r.tenants().includes('umbrella'), 10_000);
  // Its tables first, then its subscriptions: up once they run (a subscription not started yet has no lag to wait for).
  await waitFor('umbrella to be up', async () => (await gateway.health()).checks.every((check) => !check.detail.startsWith('failing')), 10_000);
  await accountsTable(places.umbrella!);
  // The owner's stamp of umbrella opens on its own schedule: its first change waits for it.
  await waitFor(
    'the owner to reach umbrella',
    () =>
      change('umbrella', 'u-1', 'umbrella one').then(
        () => true,
        () => false,
      ),
    10_000,
  );
  await r.caughtUp();
  assert.deepEqual(await rowsIn(places.umbrella!), ['umbrella/u-1:umbrella one']);
  assert.equal((await r.get('u-1', { tenant: 'umbrella' }))?.name, 'umbrella one');
});

test('stamps that are not PostgreSQL: the replica refuses them with INVALID_OPTIONS, naming why', async (t) => {
  const stamps = tenantStamps({ tenants: ['acme'], backbone: () => memory(), onWarning: () => undefined });
  const bus = createBus({ service: 'gateway', backbone: stamps }) as unknown as Bus<PgTransaction>;
  t.after(() => bus.stop());
  const r = replica(bus, accounts, { driftCheckEveryMs: 0 });
  await bus.start();
  const refused =
    /replica accounts(-late)?: the stamp of tenant acme runs on the memory backbone, and a replica keeps its tables in each stamp's PostgreSQL database/;
  await assert.rejects(r.get('a-1', { tenant: 'acme' }), { code: 'INVALID_OPTIONS', message: refused });
  // Made once the stamps are known: refused at once.
  assert.throws(() => replica(bus, accounts, { instance: 'late' }), { code: 'INVALID_OPTIONS', message: refused });
});
