/**
 * Replicas against a real PostgreSQL server: built by replay equal to the source, drift injected and
 * repaired with messages that grow with the differences, rebuild under live traffic, and versions that
 * never move backwards.
 */
import assert from 'node:assert/strict';
import { after, test, type TestContext } from 'node:test';
import { z } from 'zod';
import { defineEvent, type DataOf } from '../src/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { defineReplica, defineSource, feed, replica, requestRebuild, source, type Replica, type ReplicaOptions } from '../src/replica/index.ts';
import { pgWorld, type PgWorld } from './fixtures/bus.ts';
import { tidingsInProcess } from './fixtures/cli.ts';
import { connect, DATABASE_URL, sleep, sql, waitFor } from './helpers.ts';

const UserChanged = defineEvent('test.user-changed', {
  schema: z.object({ id: z.string(), version: z.number().int(), name: z.string(), score: z.number().int() }),
  key: (user) => user.id,
});
const UserDeleted = defineEvent('test.user-deleted', { schema: z.object({ id: z.string(), version: z.number().int() }), key: (user) => user.id });
const UserRenamed = defineEvent('test.user-renamed', {
  schema: z.object({ id: z.string(), version: z.number().int(), name: z.string() }),
  key: (user) => user.id,
});

type User = DataOf<typeof UserChanged>;

const users = defineReplica<User>({
  name: 'users',
  source: 'test.users',
  feeds: [
    feed(UserChanged),
    feed(UserDeleted, { delete: true }),
    feed<User, typeof UserRenamed>(UserRenamed, { apply: (row, e) => (row === undefined ? null : { ...row, name: e.name, version: e.version }) }),
  ],
});

const replicas: Replica<User>[] = [];
after(() => {
  for (const r of replicas) r.stop();
});

/** The identity side: a users table, its source declaration, and writes that publish in the same transaction. */
async function identity(world: PgWorld) {
  const { schema } = world;
  const bus = world.bus('identity');
  const src = source(
    bus,
    defineSource({
      name: 'test.users',
      select: `select id as key, version, jsonb_build_object('id', id, 'version', version, 'name', name, 'score', score) as state from "${schema}".users`,
    }),
  );
  await bus.start();
  await bus.transaction((tx) =>
    tx.query(`create table "${schema}".users (id text primary key, version int8 not null, name text not null, score int not null)`),
  );
  const versions = new Map<string, number>();
  /** Upserts or deletes a user and publishes the event in the same transaction. */
  const change = async (tx: PgTransaction, id: string, op: 'upsert' | 'delete', name = `name-${id}`, score = 0) => {
    const version = (versions.get(id) ?? 0) + 1;
    versions.set(id, version);
    if (op === 'delete') {
      await tx.query(`delete from "${schema}".users where id = $1`, [id]);
      await bus.publish(UserDeleted, { id, version }, { tx });
    } else {
      await tx.query(
        `insert into "${schema}".users (id, version, name, score) values ($1, $2, $3, $4)
         on conflict (id) do update set version = excluded.version, name = excluded.name, score = excluded.score`,
        [id, version, name, score],
      );
      await bus.publish(UserChanged, { id, version, name, score }, { tx });
    }
  };
  return { bus, src, change, versions };
}

/** A schema of its own for `t` with the identity side running; undefined when PostgreSQL is unreachable. */
async function identityWorld(t: TestContext) {
  const world = await pgWorld(t, 'rp', { poolSize: 4 });
  if (world === undefined) return undefined;
  return { world, schema: world.schema, ...(await identity(world)) };
}

/** The gateway side: a replica of the users on a bus of its own, both started. */
async function gatewayReplica(world: PgWorld, options: ReplicaOptions) {
  const gateway = world.bus('gateway');
  const r = replica(gateway, users, options);
  replicas.push(r);
  await gateway.start();
  await r.start();
  return { gateway, r };
}

function sourceRows(schema: string) {
  return sql(
    `select id as key, version::int8::text as version, jsonb_build_object('id', id, 'version', version, 'name', name, 'score', score) as state from "${schema}".users order by id`,
  );
}

function replicaRows(r: Replica<User>) {
  return sql(`select key, version::text as version, state from ${r.view} order by key`);
}

test('a replica built by replaying 10,000 changes over 1,000 keys (updates and deletes) equals the source', async (t) => {
  const w = await identityWorld(t);
  if (w === undefined) return;
  const { world, schema, change, bus: idBus } = w;
  let seed = 42;
  const random = () => (seed = (seed * 1_103_515_245 + 12_345) % 2_147_483_648) / 2_147_483_648;
  let deletes = 0;
  for (let batch = 0; batch < 100; batch++) {
    await idBus.transaction(async (tx) => {
      for (let i = 0; i < 100; i++) {
        const id = `u-${String(Math.floor(random() * 1_000)).padStart(4, '0')}`;
        const op = random() < 0.1 ? 'delete' : 'upsert';
        if (op === 'delete') deletes++;
        await change(tx, id, op, `n${batch}-${i}`, Math.floor(random() * 1_000));
      }
    });
  }
  // The replica starts after the fact: it fills itself by replaying the source's events from the start.
  const gateway = world.bus('gateway');
  const r = replica(gateway, users, { bootstrap: 'replay', driftCheckEveryMs: 0, subscription: { concurrency: 16 } });
  replicas.push(r);
  const started = Date.now();
  await gateway.start();
  await r.start();
  await r.caughtUp(60_000);
  const expected = await sourceRows(schema);
  assert.ok(expected.length > 500 && deletes > 500, `a real mix: ${expected.length} live keys, ${deletes} deletes`);
  assert.deepEqual(await replicaRows(r), expected);
  const stats = r.stats();
  assert.equal(stats.applied + stats.stale, 10_000, 'every event handled once');
  t.diagnostic(`replayed 10,000 events in ${Date.now() - started} ms; ${expected.length} live keys`);
  const check = await r.checkDrift();
  assert.deepEqual([check.missing, check.extra, check.different], [0, 0, 0]);
  assert.deepEqual(check.messages, { sent: 1, received: 1 }, 'equal roots: one request, one reply');
  const one = expected[0]!;
  assert.deepEqual(await r.get(one.key), one.state);
  assert.deepEqual(
    (await r.query(`state->>'name' = $1`, [one.state.name])).map((u) => u.id),
    [one.key],
  );
  const staleness = await r.staleness();
  assert.equal(staleness.lag, 0);
  assert.ok(staleness.newestEventAt instanceof Date && staleness.ageMs !== null);
});

test('drift injected three ways is found and repaired by one check, a second finds nothing, and messages grow with differences not keys', async (t) => {
  const w = await identityWorld(t);
  if (w === undefined) return;
  const { world, schema } = w;
  const client = await connect();
  t.after(() => client.end());
  const KEYS = 100_000;
  await client.query(
    `insert into "${schema}".users (id, version, name, score) select 'u-' || lpad(i::text, 6, '0'), 1, 'name-' || i, i % 997 from generate_series(1, $1) i`,
    [KEYS],
  );
  const gateway = world.bus('gateway');
  const r = replica(gateway, users, { bootstrap: 'transfer', driftCheckEveryMs: 0, pageSize: 5_000 });
  replicas.push(r);
  await gateway.start();
  let started = Date.now();
  await r.start(); // a new replica with bootstrap 'transfer' fills itself by state transfer
  t.diagnostic(`state transfer of ${KEYS} keys: ${Date.now() - started} ms`);
  assert.equal(Number((await client.query(`select count(*) from ${r.view}`)).rows[0].count), KEYS);

  started = Date.now();
  const clean = await r.checkDrift();
  t.diagnostic(`check of ${KEYS} equal keys: ${Date.now() - started} ms, ${JSON.stringify(clean.messages)}`);
  assert.deepEqual([clean.missing, clean.extra, clean.different], [0, 0, 0]);
  assert.deepEqual(clean.messages, { sent: 1, received: 1 });

  // 1. A replica row edited by hand. 2. A replica row deleted. 3. A source change whose event was never
  // published. 4. A source row deleted without an event.
  await client.query(`update ${r.view} set state = jsonb_set(state, '{name}', '"edited by hand"') where key = 'u-000001'`);
  await client.query(`delete from ${r.view} where key = 'u-000002'`);
  await client.query(`update "${schema}".users set version = 2, name = 'changed silently' where id = 'u-000003'`);
  await client.query(`delete from "${schema}".users where id = 'u-000004'`);
  const found = await r.checkDrift();
  t.diagnostic(`check with 4 differences: ${found.durationMs} ms, ${JSON.stringify(found.messages)}, ${found.entries} entries`);
  assert.equal(found.different, 2);
  assert.deepEqual([...found.samples.different].sort(), ['u-000001', 'u-000003']);
  assert.equal(found.missing, 1);
  assert.deepEqual(found.samples.missing, ['u-000002']);
  assert.equal(found.extra, 1);
  assert.deepEqual(found.samples.extra, ['u-000004']);
  assert.equal(found.repaired, 4);
  assert.equal((await r.get('u-000001'))?.name, 'name-1');
  assert.equal((await r.get('u-000002'))?.name, 'name-2');
  assert.equal((await r.get('u-000003'))?.name, 'changed silently');
  assert.equal(await r.get('u-000004'), undefined);
  const again = await r.checkDrift();
  assert.deepEqual([again.missing, again.extra, again.different, again.repaired], [0, 0, 0, 0]);
  assert.deepEqual(again.messages, { sent: 1, received: 1 });
  assert.deepEqual(await replicaRows(r), await sourceRows(schema));

  // Messages and entries against the number of differing keys, in a replica of 100,000 keys.
  const figures: Array<{ differences: number; messages: number; entries: number; ms: number }> = [];
  for (const differences of [1, 10, 100, 1_000]) {
    await client.query(`update ${r.view} set state = jsonb_set(state, '{score}', '-1') where key in (select key from ${r.view} order by md5(key) limit $1)`, [
      differences,
    ]);
    const report = await r.checkDrift();
    assert.equal(report.different, differences);
    assert.equal(report.repaired, differences);
    figures.push({ differences, messages: report.messages.sent + report.messages.received, entries: report.entries, ms: report.durationMs });
  }
  t.diagnostic(`differences -> messages, entries, ms: ${figures.map((f) => `${f.differences} -> ${f.messages}, ${f.entries}, ${f.ms}`).join('; ')}`);
  const [one, ten, hundred, thousand] = figures as [(typeof figures)[0], (typeof figures)[0], (typeof figures)[0], (typeof figures)[0]];
  assert.ok(one.entries < 200, `one difference costs ${one.entries} entries, not ${KEYS}`);
  assert.ok(one.messages <= 10, `one difference costs ${one.messages} messages`);
  assert.ok(one.entries < ten.entries && ten.entries < hundred.entries && hundred.entries < thousand.entries, 'entries grow with the differences');
  assert.ok(one.messages <= ten.messages && ten.messages <= hundred.messages && hundred.messages < thousand.messages, 'messages grow with the differences');
  assert.ok(thousand.entries < KEYS / 2, `1,000 differences cost ${thousand.entries} entries, well under the ${KEYS} keys`);
  assert.deepEqual([(await r.checkDrift()).different], [0]);
});

test('a rebuild under live traffic: reads never see a partial replica, and no event is lost', async (t) => {
  const w = await identityWorld(t);
  if (w === undefined) return;
  const { world, schema, change, bus: idBus } = w;
  const KEYS = 1_000;
  const ids = Array.from({ length: KEYS }, (_, i) => `u-${String(i).padStart(5, '0')}`);
  await idBus.transaction(async (tx) => {
    for (const id of ids) await change(tx, id, 'upsert');
  });
  const { r } = await gatewayReplica(world, { bootstrap: 'replay', memory: true, driftCheckEveryMs: 0, pageSize: 100 });
  await r.caughtUp();

  let traffic = true;
  let updates = 0;
  const writer = (async () => {
    while (traffic) {
      await idBus.transaction(async (tx) => {
        for (let i = 0; i < 5; i++) await change(tx, ids[Math.floor(Math.random() * KEYS)]!, 'upsert', `live-${updates}`, updates);
      });
      updates += 5;
      await sleep(5);
    }
  })();
  const client = await connect();
  t.after(() => client.end());
  let reads = 0;
  let reading = true;
  const reader = (async () => {
    while (reading) {
      const count = Number((await client.query(`select count(*) from ${r.view}`)).rows[0].count);
      assert.equal(count, KEYS, 'the view always shows a whole replica');
      const id = ids[Math.floor(Math.random() * KEYS)]!;
      assert.ok((await r.get(id)) !== undefined, `memory has ${id}`);
      reads++;
    }
  })();
  const progress: number[] = [];
  let report: Awaited<ReturnType<typeof r.rebuild>>;
  try {
    report = await r.rebuild({ onProgress: ({ done }) => progress.push(done) });
  } finally {
    reading = false;
    traffic = false;
    await Promise.all([reader, writer]);
  }
  t.diagnostic(
    `rebuild: ${report.rows} rows in ${report.durationMs} ms over ${report.messages.sent + report.messages.received} messages; ${updates} live updates, ${reads} reads meanwhile`,
  );
  assert.equal(report.generation, 2);
  assert.ok(report.rows >= KEYS);
  assert.ok(progress.length >= KEYS / 100 && progress.at(-1)! >= KEYS, 'progress reported page by page');
  assert.ok(updates > 0 && reads > 0);
  await r.caughtUp();
  assert.deepEqual(await replicaRows(r), await sourceRows(schema), 'nothing lost: the new table has every live update');
  for (const row of await sourceRows(schema)) assert.deepEqual(await r.get(row.key), row.state);
  assert.equal(r.stats().memoryRows, KEYS);
});

test('out-of-order and duplicate deliveries never move a row backwards, and a tombstone keeps an older upsert out', async (t) => {
  const world = await pgWorld(t, 'rp', { poolSize: 4 });
  if (world === undefined) return;
  const { schema } = world;
  const idBus = world.bus('identity');
  await idBus.start();
  const { r } = await gatewayReplica(world, { memory: true, driftCheckEveryMs: 0 });
  const user = (version: number, name: string) => ({ id: 'k', version, name, score: version });
  // Each publish is its own message (its own id), as a redelivery by a publisher that retried would be.
  for (const [version, name] of [
    [3, 'three'],
    [1, 'one'],
    [2, 'two'],
    [3, 'three again'],
  ] as const)
    await idBus.publish(UserChanged, user(version, name));
  await idBus.publish(UserRenamed, { id: 'k', version: 2, name: 'renamed late' });
  await waitFor('five events handled', () => r.stats().applied + r.stats().stale === 5);
  await r.caughtUp(); // the table is written when the batch commits; memory a moment earlier
  assert.deepEqual(await r.get('k'), user(3, 'three'));
  assert.deepEqual(await r.query(), [user(3, 'three')]);
  await idBus.publish(UserRenamed, { id: 'k', version: 4, name: 'four' });
  await idBus.publish(UserDeleted, { id: 'k', version: 6 });
  await idBus.publish(UserChanged, user(5, 'five, after the delete'));
  await idBus.publish(UserRenamed, { id: 'k', version: 7, name: 'renamed after the delete' });
  await waitFor('nine events handled', () => r.stats().applied + r.stats().stale === 9);
  await r.caughtUp();
  assert.equal(await r.get('k'), undefined, 'the delete at version 6 holds');
  assert.deepEqual(await r.query(), []);
  const client = await connect();
  t.after(() => client.end());
  const { rows } = await client.query(`select version::int as version, state from "${schema}".replica_users_g1 where key = 'k'`);
  assert.deepEqual(rows, [{ version: 7, state: null }], 'a tombstone, at the version of the last event that concerned the key');
  const stats = r.stats();
  assert.equal(stats.applied, 4, 'v3, the rename to v4, the delete at v6, the rename at v7 (applied to nothing: still deleted)');
  assert.equal(stats.stale, 5);
  assert.equal(stats.deleted, 2);
});

test('tidings drift check asks the running replica over the bus and prints its report; status and drift status list replicas', async (t) => {
  const w = await identityWorld(t);
  if (w === undefined) return;
  const { world, schema, change, bus: idBus } = w;
  await idBus.transaction(async (tx) => {
    for (let i = 0; i < 50; i++) await change(tx, `u-${i}`, 'upsert');
  });
  const { r } = await gatewayReplica(world, { instance: 'gw1', driftCheckEveryMs: 0 });
  await r.caughtUp();
  const client = await connect();
  t.after(() => client.end());
  await client.query(`delete from ${r.view} where key = 'u-7'`);

  const cli = tidingsInProcess(schema);
  const checked = await cli('drift', 'check', 'users-gw1', '--timeout', '20');
  assert.match(checked, /Replica users-gw1: 1 missing, 0 extra, 0 different; 1 repaired\./);
  assert.match(checked, /missing: u-7/);
  assert.equal((await r.get('u-7'))?.id, 'u-7');
  assert.equal(r.stats().checks, 1, 'the check ran in the replica');
  const status = await cli('status');
  assert.match(status, /Replicas\n/);
  assert.match(status, /users-gw1 +test\.users +50 +1 /);
  const json = JSON.parse(await cli('--json', 'drift', 'status'));
  assert.equal(json.replicas[0].name, 'users-gw1');
  assert.equal(json.replicas[0].lastCheck.missing, 1);
  await assert.rejects(cli('drift', 'check', 'nope'), /No replica "nope" in schema .*there are: users-gw1/);
});

test('tidings replica rebuild asks the running replica over the bus, follows the progress it reports, and prints its report', async (t) => {
  const w = await identityWorld(t);
  if (w === undefined) return;
  const { world, schema } = w;
  const client = await connect();
  t.after(() => client.end());
  const KEYS = 5_000;
  await client.query(
    `insert into "${schema}".users (id, version, name, score) select 'u-' || lpad(i::text, 5, '0'), 1, 'name-' || i, i from generate_series(1, $1) i`,
    [KEYS],
  );
  // Small pages: the rebuild takes a few dozen round trips, so there is progress to see.
  const { gateway, r } = await gatewayReplica(world, { instance: 'gw1', bootstrap: 'transfer', driftCheckEveryMs: 0, pageSize: 50, memory: true });
  assert.equal(r.stats().memoryRows, KEYS);
  await client.query(`update "${schema}".users set name = 'changed without an event' where id = 'u-00042'`);

  const progress: Array<{ done: number; total: number | null }> = [];
  const report = await requestRebuild({ url: DATABASE_URL, schema, replica: 'users-gw1', db: client, timeoutMs: 20_000, onProgress: (p) => progress.push(p) });
  t.diagnostic(`rebuild over the bus: ${report.rows} rows in ${report.durationMs} ms, ${progress.length} progress reports`);
  assert.equal(report.generation, 3, 'generation 2 was the bootstrap transfer');
  assert.equal(report.rows, KEYS);
  assert.ok(
    progress.some((p) => p.done > 0 && p.done < KEYS && p.total === KEYS),
    `progress from the replica during the rebuild: ${JSON.stringify(progress)}`,
  );
  assert.deepEqual(progress.at(-1), { done: KEYS, total: KEYS });
  for (let i = 1; i < progress.length; i++) assert.ok(progress[i]!.done >= progress[i - 1]!.done, 'progress never goes back');
  assert.equal((await r.get('u-00042'))?.name, 'changed without an event', 'memory reloaded from the new table');
  assert.equal(r.stats().rebuilds, 2);

  const cli = tidingsInProcess(schema);
  const json = JSON.parse(await cli('--json', 'replica', 'rebuild', 'users-gw1', '--timeout', '20'));
  assert.deepEqual([json.replica, json.generation, json.rows], ['users-gw1', 4, KEYS]);
  assert.match(
    await cli('replica', 'rebuild', 'users-gw1'),
    /^Replica users-gw1 rebuilt: generation 5, 5000 rows from its source in [\d.]+ m?s \(\d+ messages\)\.\n$/,
  );
  assert.deepEqual(await replicaRows(r), await sourceRows(schema));
  assert.match(await cli('drift', 'status'), /users-gw1 +test\.users +5000 +5 /);
  await assert.rejects(cli('replica', 'rebuild', 'nope'), /No replica "nope" in schema .*there are: users-gw1/);

  // A replica whose process is not running: the CLI gives up after --timeout and says where to look.
  r.stop();
  await gateway.stop();
  await assert.rejects(
    cli('replica', 'rebuild', 'users-gw1', '--timeout', '1'),
    /reported nothing on rebuild .* for 1 s\. Is its service running \(its subscription replica\.users-gw1\.replies/,
  );
});
