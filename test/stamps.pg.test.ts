/**
 * A backbone per tenant on real PostgreSQL: a schema per tenant and a database per tenant (tidings/stamps).
 * Isolation is counted in the tables: every row of a tenant's stamp is that tenant's, every message is handled
 * once, in per-key order, by competing consumers; a stamp whose database is missing holds up its tenant alone.
 */
import assert from 'node:assert/strict';
import { type TestContext, test } from 'node:test';
import { createBus, deadLetter, type Bus, type TidingsError } from '../src/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { tenantStamps, type TenantStamps } from '../src/stamps/index.ts';
import { quickPostgres } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { createEffects, DATABASE_URL, requirePostgres, sql, uniqueSchema, waitFor } from './helpers.ts';
import { Invoiced, Placed } from './fixtures/stamps.ts';
import { ensureDatabase, onDatabase, testDatabase, urlOf } from './fixtures/databases.ts';

interface Place {
  readonly database: string;
  readonly schema: string;
}

/** Stamps over PostgreSQL, each tenant at its `place`; schemas dropped when the test ends. */
function stampsAt(t: TestContext, places: Record<string, Place>) {
  const buses: Bus<PgTransaction>[] = [];
  t.after(async () => {
    for (const bus of buses) await bus.stop().catch(() => undefined);
    for (const { database, schema } of Object.values(places)) {
      await onDatabase(database, (client) => client.query(`drop schema if exists "${schema}" cascade`)).catch(() => undefined);
    }
  });
  const warnings: string[] = [];
  const backbone = (): TenantStamps<PgTransaction> =>
    tenantStamps({
      tenants: Object.keys(places),
      reopenMs: 200,
      onWarning: (message) => warnings.push(message),
      backbone: (tenant) => postgres({ ...quickPostgres, poolSize: 3, url: urlOf(places[tenant]!.database), schema: places[tenant]!.schema }),
    });
  return {
    warnings,
    bus(service: string, stamps = backbone()) {
      const bus = createBus({ service, backbone: stamps });
      buses.push(bus);
      return { bus, stamps };
    },
  };
}

async function effectsTable({ database, schema }: Place): Promise<void> {
  await onDatabase(database, async (client) => {
    await client.query(`create schema if not exists "${schema}"`);
    await client.query(`create table "${schema}".effects (n bigserial primary key, message_id text unique not null, tenant text, key text, seq int, db text)`);
  });
}

test('schema per tenant and database per tenant: each stamp holds its tenant only; once each, in key order, with two consumers', async (t) => {
  if (!(await requirePostgres(t))) return;
  await ensureDatabase('tidings_stamp_b');
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('sa') },
    globex: { database: testDatabase, schema: uniqueSchema('sg') },
    initech: { database: 'tidings_stamp_b', schema: uniqueSchema('si') },
  };
  for (const place of Object.values(places)) await effectsTable(place);
  const world = stampsAt(t, places);
  const consumers = [world.bus('billing-1').bus, world.bus('billing-2').bus];
  for (const bus of consumers) {
    bus.subscribe(
      'billing',
      Placed,
      async (message, ctx) => {
        const { schema } = places[message.tenant!]!;
        await ctx.tx!.query(`insert into "${schema}".effects (message_id, tenant, key, seq, db) values ($1, $2, $3, $4, current_database())`, [
          message.id,
          message.tenant,
          message.data.key,
          message.data.seq,
        ]);
        await ctx.publish(Invoiced, message.data);
      },
      { concurrency: 4 },
    );
    await bus.start();
  }
  const { bus: publisher } = world.bus('orders');
  const keys = 6;
  const perKey = 15;
  await Promise.all(
    Object.keys(places).map(async (tenant, i) => {
      for (let seq = 0; seq < perKey; seq++) {
        for (let k = 0; k < keys; k++) {
          const data = { key: `key-${k}`, seq };
          // One tenant publishes in transactions of its stamp, one alone, one in batches: every path routes.
          if (i === 0) await publisher.withTenant(tenant, () => publisher.transaction((tx) => publisher.publish(Placed, data, { tx })));
          else if (i === 1) await publisher.publish(Placed, data, { tenant });
        }
        if (i === 2)
          await publisher.publishMany(
            Placed,
            Array.from({ length: keys }, (_, k) => ({ key: `key-${k}`, seq })),
            { tenant },
          );
      }
    }),
  );
  const total = keys * perKey;
  for (const [tenant, place] of Object.entries(places)) {
    await waitFor(`${tenant}'s messages handled`, async () => {
      const [{ count }] = await onDatabase(place.database, async (c) => (await c.query(`select count(*)::int as count from "${place.schema}".effects`)).rows);
      return count >= total;
    });
  }
  for (const [tenant, place] of Object.entries(places)) {
    await onDatabase(place.database, async (client) => {
      const effects = (await client.query(`select message_id, tenant, key, seq, db from "${place.schema}".effects order by n`)).rows;
      assert.equal(effects.length, total, `${tenant}: each message handled exactly once`);
      assert.deepEqual(
        [...new Set(effects.map((row) => `${row.tenant}@${row.db}`))],
        [`${tenant}@${place.database}`],
        `${tenant}: handled in its own database`,
      );
      const byKey = new Map<string, number[]>();
      for (const row of effects) byKey.set(row.key, [...(byKey.get(row.key) ?? []), row.seq]);
      for (const [key, seqs] of byKey)
        assert.deepEqual(
          seqs,
          Array.from({ length: perKey }, (_, s) => s),
          `${tenant} ${key}: in order`,
        );
      // The stamp's log: its tenant's messages and what their handlers published, nothing of another tenant.
      await waitFor(`${tenant}'s invoices`, async () => {
        const rows = (await client.query(`select tenant, topic, count(*)::int as count from "${place.schema}".log group by 1, 2 order by 2`)).rows;
        assert.ok(
          rows.every((row) => row.tenant === tenant),
          `${tenant}'s log holds ${JSON.stringify(rows)}`,
        );
        return (
          JSON.stringify(rows.map((row) => [row.topic, row.count])) ===
          JSON.stringify([
            ['stamps.invoiced', total],
            ['stamps.placed', total],
          ])
        );
      });
    });
  }
});

test('a stamp whose database is missing holds up its tenant alone; it joins once the database exists', async (t) => {
  if (!(await requirePostgres(t))) return;
  const missing = `tidings_stamp_${process.pid}_${Math.random().toString(36).slice(2, 6)}`;
  t.after(() => onDatabase(testDatabase, (client) => client.query(`drop database if exists "${missing}" with (force)`)));
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('sa') },
    umbrella: { database: missing, schema: uniqueSchema('su') },
  };
  const world = stampsAt(t, places);
  const { bus, stamps } = world.bus('billing');
  const handled: string[] = [];
  bus.subscribe('billing', Placed, (message) => {
    handled.push(`${message.tenant}:${message.data.seq}`);
  });
  await bus.start();
  assert.match(world.warnings[0] ?? '', new RegExp(`stamp of tenant umbrella could not open \\(.*${missing}.*\\); its tenant waits while the others run`));
  await bus.publish(Placed, { key: 'k', seq: 1 }, { tenant: 'acme' });
  await assert.rejects(bus.publish(Placed, { key: 'k', seq: 2 }, { tenant: 'umbrella' }), (error: TidingsError) => {
    assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
    assert.match(error.message, /stamp of tenant umbrella is unavailable .*the other tenants' stamps are not affected/);
    assert.equal(error.retryable, true);
    return true;
  });
  // A publishMany across both tenants writes acme's and names the tenant that failed.
  await assert.rejects(
    Promise.all([bus.publish(Placed, { key: 'k', seq: 3 }, { tenant: 'acme' }), bus.publish(Placed, { key: 'k', seq: 4 }, { tenant: 'umbrella' })]),
    /umbrella/,
  );
  await waitFor("acme's messages", () => handled.length === 2);
  // The process stays ready (acme runs); umbrella's failure is listed with the reason.
  const health = await bus.health();
  assert.equal(health.ready, true);
  const umbrella = health.checks.filter((check) => check.name.startsWith('umbrella'));
  assert.deepEqual(
    umbrella.map((check) => check.name),
    ['umbrella: stamp'],
  );
  assert.match(umbrella[0]!.detail, new RegExp(`^failing: not open: .*${missing}`));
  assert.ok(
    health.checks.some((check) => check.name === 'acme: database' && check.ok),
    JSON.stringify(health.checks),
  );

  await onDatabase(testDatabase, (client) => client.query(`create database "${missing}"`));
  await waitFor('umbrella to open', async () => (await bus.health()).checks.every((check) => !check.detail.startsWith('failing')), 10_000);
  await bus.publish(Placed, { key: 'k', seq: 5 }, { tenant: 'umbrella' });
  await waitFor("umbrella's message", () => handled.includes('umbrella:5'));
  assert.deepEqual(handled.sort(), ['acme:1', 'acme:3', 'umbrella:5']);
  assert.deepEqual(Object.keys(await stamps.statusByTenant()).sort(), ['acme', 'umbrella']);
});

test('dead letters and status per stamp, with the tenant named; a tenant added at run time; the tenants from a function', async (t) => {
  if (!(await requirePostgres(t))) return;
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('sa') },
    globex: { database: testDatabase, schema: uniqueSchema('sg') },
    hooli: { database: testDatabase, schema: uniqueSchema('sh') },
  };
  const world = stampsAt(t, places);
  const stamps = tenantStamps({
    tenants: async () => ['acme', 'globex'],
    backbone: (tenant) => postgres({ ...quickPostgres, poolSize: 3, url: DATABASE_URL, schema: places[tenant]!.schema }),
  });
  const { bus } = world.bus('billing', stamps);
  bus.subscribe('billing', Placed, (message) => (message.tenant === 'globex' ? deadLetter('card declined') : undefined));
  await bus.start();
  assert.deepEqual(stamps.tenants(), ['acme', 'globex']);
  await stamps.addTenant('hooli');
  for (const tenant of ['acme', 'globex', 'hooli']) await bus.publish(Placed, { key: 'k', seq: 1 }, { tenant });
  const store = stamps.deadLetters();
  await waitFor('the dead letter', async () => (await store.count({ all: true })) === 1);
  const [letter] = (await store.list({ all: true })).deadLetters;
  assert.equal(letter?.tenant, 'globex');
  assert.match(letter!.id, /^globex\//);
  await waitFor('every stamp handled its message', async () => {
    const byTenant = await stamps.statusByTenant();
    return ['acme', 'globex', 'hooli'].every((tenant) => byTenant[tenant]?.subscriptions.find((s) => s.name === 'billing')?.lag === 0);
  });
  const byTenant = await stamps.statusByTenant();
  assert.equal(byTenant.globex?.subscriptions.find((s) => s.name === 'billing')?.deadLetters, 1);
  assert.equal(byTenant.acme?.subscriptions.find((s) => s.name === 'billing')?.deadLetters, 0);
  const summed = await stamps.status();
  assert.equal(summed.subscriptions.find((s) => s.name === 'billing')?.deadLetters, 1);
  // Each stamp's registry records the service, so each tenant's operators see it.
  for (const tenant of ['acme', 'hooli']) {
    const services = (await stamps.stamp(tenant).contracts?.()?.services()) ?? [];
    assert.ok(
      services.some((service) => service.service === 'billing'),
      tenant,
    );
  }
});

test('kill -9 of a worker on the stamps mid-batch: each tenant message handled once, in key order, in its own schema', async (t) => {
  if (!(await requirePostgres(t))) return;
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('ka') },
    globex: { database: testDatabase, schema: uniqueSchema('kg') },
  };
  for (const { schema } of Object.values(places)) await createEffects(schema);
  const world = stampsAt(t, places);
  const { bus: publisher } = world.bus('orders');
  await publisher.start();
  const env = { STAMPS: JSON.stringify(Object.fromEntries(Object.entries(places).map(([tenant, place]) => [tenant, place.schema]))), HANDLE_MS: '5' };
  const first = await startProcess('stamp-worker', env);
  const keys = 5;
  const perKey = 20;
  const publishing = Promise.all(
    Object.keys(places).map(async (tenant) => {
      for (let seq = 0; seq < perKey; seq++) {
        await publisher.publishMany(
          Ticked,
          Array.from({ length: keys }, (_, k) => ({ key: `key-${k}`, seq })),
          { tenant },
        );
      }
    }),
  );
  // Killed while handling: its batch's effects roll back with the unacknowledged batch.
  await first.nextLine(/^handling globex\//, 30_000);
  await first.nextLine(/^handling /, 30_000);
  first.kill();
  await first.exited;
  const second = await startProcess('stamp-worker', env);
  t.after(() => second.stop());
  await publishing;
  for (const [tenant, { schema }] of Object.entries(places)) {
    await waitFor(`${tenant}'s messages handled`, async () => (await sql(`select count(*)::int as n from "${schema}".effects`))[0].n >= keys * perKey, 60_000);
    const rows = await sql<{ message_id: string; key: string; seq: number }>(`select message_id, key, seq from "${schema}".effects order by n`);
    assert.equal(rows.length, keys * perKey, `${tenant}: each message once (effects through ctx.tx)`);
    assert.equal(new Set(rows.map((row) => row.message_id)).size, rows.length, `${tenant}: no message twice`);
    const byKey = new Map<string, number[]>();
    for (const row of rows) byKey.set(row.key, [...(byKey.get(row.key) ?? []), row.seq]);
    for (const [key, seqs] of byKey)
      assert.deepEqual(
        seqs,
        Array.from({ length: perKey }, (_, i) => i),
        `${tenant} ${key}: in order`,
      );
    const [{ others }] = await sql(`select count(*)::int as others from "${schema}".log where tenant is distinct from $1`, [tenant]);
    assert.equal(others, 0, `${tenant}'s log holds no other tenant's message`);
  }
  t.diagnostic(`killed worker ${first.pid} after ${first.lines.filter((line) => line.startsWith('handling')).length} handlings; worker ${second.pid} finished`);
});

test('a recurring schedule ticks once per tenant, in each stamp, however many processes run it; a tenant removed at run time stops', async (t) => {
  if (!(await requirePostgres(t))) return;
  const places: Record<string, Place> = {
    acme: { database: testDatabase, schema: uniqueSchema('ta') },
    globex: { database: testDatabase, schema: uniqueSchema('tg') },
  };
  const world = stampsAt(t, places);
  const handled: string[] = [];
  const one = world.bus('clock');
  const two = world.bus('clock');
  for (const { bus } of [one, two]) {
    bus.schedule('every-second', '* * * * * *', Ticked, (tick) => ({ key: 'tick', seq: tick.getTime() / 1000 }));
    bus.subscribe('count', Ticked, (message) => {
      handled.push(`${message.tenant}:${message.data.seq}`);
    });
  }
  await Promise.all([one.bus.start(), two.bus.start()]);
  await waitFor(
    'three ticks of each tenant',
    () => ['acme', 'globex'].every((tenant) => handled.filter((h) => h.startsWith(`${tenant}:`)).length >= 3),
    10_000,
  );

  // Each tick once per tenant, in its own schema, though two processes fired it.
  const ticks = async (tenant: string) =>
    onDatabase(testDatabase, async (client) => {
      const { rows } = await client.query<{ id: string; tenant: string | null }>(
        `select id, tenant from "${places[tenant]!.schema}".log where topic = 'test.ticked'`,
      );
      return rows;
    });
  for (const tenant of ['acme', 'globex']) {
    const rows = await ticks(tenant);
    assert.ok(rows.length >= 3, `${tenant}: ${rows.length} ticks`);
    assert.equal(new Set(rows.map((row) => row.id)).size, rows.length, `${tenant}: one message per tick`);
    assert.ok(
      rows.every((row) => row.tenant === tenant),
      `${tenant}: its ticks only`,
    );
  }
  assert.equal(new Set(handled).size, handled.length, 'each tick handled once');

  // Removing globex: its publishes are refused, its consumers stop, its ticks stop; acme goes on.
  await Promise.all([one.stamps.removeTenant('globex'), two.stamps.removeTenant('globex')]);
  assert.deepEqual(one.stamps.tenants(), ['acme']);
  await assert.rejects(one.bus.publish(Ticked, { key: 'k', seq: 1 }, { tenant: 'globex' }), { code: 'TENANT_UNKNOWN' });
  const globexTicks = (await ticks('globex')).length;
  const acmeTicks = (await ticks('acme')).length;
  await waitFor('two more ticks of acme', async () => (await ticks('acme')).length >= acmeTicks + 2, 10_000);
  assert.equal((await ticks('globex')).length, globexTicks, 'no tick written to a removed tenant stamp');
  await one.stamps.addTenant('globex');
  await waitFor('globex ticks again once added back', async () => (await ticks('globex')).length > globexTicks, 10_000);
});
