/**
 * A window read from its floor (migration 017, consume/lanes.ts): its first read starts at `done`'s last
 * position, or below it at the lowest message of the transactions that held an xid when `done` was taken,
 * and walks positions from there. These tests attack what would make that floor too high: a statement that
 * numbers a row before it takes its xid, transactions that numbered their messages long before and commit
 * after a restart, out of order, while the consumer is killed -9 mid-window. Counted: every message once.
 * (That the first read costs a batch, not the window, is checked on the plan: test/plans.pg.test.ts.)
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { from as copyFrom } from 'pg-copy-streams';
import { checkOrder } from './fixtures/effects.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { startProcess } from './fixtures/processes.ts';
import { loadMigrations, pendingMigrations } from '../src/postgres/migrate.ts';
import { connect, createEffects, sleep, sql, waitFor } from './helpers.ts';

const columns = 'topic, id, type, source, time, key, key_hash, correlation_id, data';

/** What another session sees of `pid` while its statement runs: its xid, and whether the log's sequence moved. */
async function whileRunning(schema: string, pid: number): Promise<{ xid: string | null; last: string | null }> {
  const watcher = await connect();
  try {
    await waitFor('the statement running', async () => {
      const { rows } = await watcher.query(`select state from pg_stat_activity where pid = $1`, [pid]);
      return rows[0]?.state === 'active';
    });
    await sleep(100);
    const { rows } = await watcher.query(
      `select (select backend_xid::text from pg_stat_activity where pid = $1) as xid,
        pg_sequence_last_value('"${schema}".log_position_seq'::regclass)::text as last`,
      [pid],
    );
    return rows[0];
  } finally {
    await watcher.end();
  }
}

test('a statement writing the log takes its transaction id before it numbers a row: INSERT and COPY', async (t) => {
  const world = await pgWorld(t, 'bl');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus();
  await bus.transaction(async () => undefined); // creates the schema
  const writer = await connect();
  try {
    const pid = Number((await writer.query('select pg_backend_pid() as pid')).rows[0].pid);
    // INSERT: the rows' source sleeps before they are numbered (the identity default is evaluated above it).
    const inserted = writer.query(
      `insert into "${schema}".log (${columns})
       select $1, 'slow', $1, 'test', now(), 'k', 0, 'slow', '{"key":"k","seq":0}' from (select pg_sleep(1.5) offset 0) s`,
      [Ticked.topic],
    );
    const duringInsert = await whileRunning(schema, pid);
    await inserted;
    assert.notEqual(duringInsert.xid, null, 'the INSERT holds an xid before its row is numbered');
    assert.equal(duringInsert.last, null, 'no position drawn yet');

    // COPY: started, no row sent yet.
    await writer.query('begin');
    const stream = writer.query(copyFrom(`copy "${schema}".log (${columns}) from stdin`));
    const duringCopy = await whileRunning(schema, pid);
    const finished = new Promise((resolve, reject) => {
      stream.on('finish', resolve);
      stream.on('error', reject);
    });
    stream.end(`${Ticked.topic}\tcopied\t${Ticked.topic}\ttest\t2026-01-01T00:00:00Z\tk\t0\tcopied\t{"key":"k","seq":1}\n`);
    await finished;
    await writer.query('commit');
    assert.notEqual(duringCopy.xid, null, 'the COPY holds an xid before its first row is numbered');
    assert.equal(duringCopy.last, '1', 'only the INSERT numbered a row so far');
  } finally {
    await writer.end();
  }
});

test('restart against a backlog of 20,000 from 8 publishers committing out of order, while transactions that numbered their messages before it commit late; killed -9 mid-window, its heir delivers each message once, in key order', async (t) => {
  const world = await pgWorld(t, 'bl');
  if (world === undefined) return;
  const { schema } = world;
  await createEffects(schema);
  const publisher = world.bus('publisher');
  await publisher.start();
  const count = async () => Number((await sql<{ n: number }>(`select count(*)::int as n from "${schema}".effects`))[0]!.n);

  // A worker reads the first 200 and stops: its cursors keep `done` with its floor.
  const first = await startProcess('worker', { SCHEMA: schema });
  await publisher.publishMany(
    Ticked,
    Array.from({ length: 200 }, (_, i) => ({ key: `k${i % 10}`, seq: Math.floor(i / 10) })),
  );
  await waitFor('the first 200', async () => (await count()) >= 200, 30_000);
  await first.stop();
  const floors = await sql<{ n: number }>(`select count(*)::int as n from "${schema}".cursors where done_next_xid is not null`);
  assert.ok(floors[0]!.n > 0, 'cursors record the floor of done');

  // Transactions that number a message now and commit only once a worker has opened a window over the backlog.
  const late = await Promise.all(
    Array.from({ length: 3 }, async (_, i) => {
      const client = await connect();
      await client.query('begin');
      await publisher.publish(Ticked, { key: `late${i}`, seq: 0 }, { tx: client });
      return client;
    }),
  );

  // The backlog: 8 publishers, transactions of 1-50 messages each held open a random while before committing.
  const publishers = 8;
  const perPublisher = 2_500;
  const publishAll = (share: number) =>
    Promise.all(
      Array.from({ length: publishers }, async (_, p) => {
        const from = share === 0 ? 0 : perPublisher * 0.8;
        const to = share === 0 ? perPublisher * 0.8 : perPublisher;
        for (let i = from; i < to; ) {
          const n = Math.min(1 + Math.floor(Math.random() * 50), to - i);
          await publisher.transaction(async (tx) => {
            await publisher.publishMany(
              Ticked,
              Array.from({ length: n }, (_, j) => ({ key: `p${p}`, seq: i + j })),
              { tx },
            );
            await sleep(Math.random() * 5);
          });
          i += n;
        }
      }),
    );
  await publishAll(0);

  // A worker starts against it while the rest is published, and is killed -9 mid-window.
  const doomed = await startProcess('worker', { SCHEMA: schema, PROGRESS: '1' });
  const rest = publishAll(1);
  await waitFor('the doomed worker midway', () => doomed.lines.length >= 1_000, 60_000);
  await late[0]!.query('commit');
  await waitFor('the doomed worker further', () => doomed.lines.length >= 2_000, 60_000);
  doomed.kill();
  assert.equal(await doomed.exited, 'SIGKILL');
  await late[1]!.query('commit');
  await rest;

  const heir = await startProcess('worker', { SCHEMA: schema });
  try {
    const before = await count();
    await waitFor('the heir under way', async () => (await count()) >= before + 1_000, 60_000);
    await late[2]!.query('commit');
    const total = 200 + publishers * perPublisher + late.length;
    await waitFor(`${total} effects`, async () => (await count()) >= total, 120_000);
    await sleep(500); // a duplicate would have arrived by now
    const rows = await sql<{ message_id: string; key: string; seq: number; worker: number }>(
      `select message_id, key, seq, worker from "${schema}".effects order by n`,
    );
    assert.equal(rows.length, total, 'one effect per message');
    assert.equal(new Set(rows.map((row) => row.message_id)).size, total, 'no message twice');
    for (let i = 0; i < late.length; i++)
      assert.ok(
        rows.some((row) => row.key === `late${i}`),
        `late message ${i} delivered`,
      );
    assert.deepEqual(checkOrder(rows), [], 'each key in order');
  } finally {
    for (const client of late) await client.end();
    await heir.stop();
  }
});

test('a database of a version before the floor (migration 017): its cursors, one mid-window, read on without loss, and record floors from then on', async (t) => {
  const world = await pgWorld(t, 'bl');
  if (world === undefined) return;
  const { schema } = world;
  const client = await connect();
  try {
    // The schema as the version before 017 made it, with a subscription whose worker stopped mid-window.
    await client.query(`create schema "${schema}"`);
    await client.query(`create table "${schema}".migrations (version integer primary key, name text not null, applied_at timestamptz not null default now())`);
    const later = new Set(
      loadMigrations()
        .filter((migration) => migration.version >= 17)
        .map((migration) => migration.version),
    );
    for (const migration of pendingMigrations(schema, later)) for (const statement of migration.statements) await client.query(statement);
    const write = (from: number, to: number) =>
      client.query(
        `insert into "${schema}".log (${columns})
         select $1, 'm' || g, $1, 'test', now(), 'k' || (g % 4), g % 4, 'm' || g, jsonb_build_object('key', 'k' || (g % 4), 'seq', g / 4)
         from generate_series($2::int, $3::int) g`,
        [Ticked.topic, from, to],
      );
    await write(0, 99); // handled by the old worker
    await client.query(`insert into "${schema}".subscriptions (name, topics, partitions) values ('old', $1, 2)`, [[Ticked.topic]]);
    await client.query(`insert into "${schema}".cursors (subscription, partition, done) select 'old', p, pg_current_snapshot() from generate_series(0, 1) p`);
    await write(100, 199);
    // Partition 1 opened a window over 100-199 and handled up to position 150 of it.
    await client.query(`update "${schema}".cursors set window_snapshot = pg_current_snapshot(), window_position = 150 where partition = 1`);
    await write(200, 299);
  } finally {
    await client.end();
  }
  const bus = world.bus();
  const seen: number[] = [];
  bus.subscribe(
    'old',
    Ticked,
    (message) => {
      seen.push(message.data.seq * 4 + Number(message.data.key.slice(1)));
    },
    { partitions: 2, batchSize: 20 },
  );
  await bus.start(); // migrates to 017 first
  const expected = Array.from({ length: 200 }, (_, i) => 100 + i).filter((g) => !(g % 2 === 1 && g < 150));
  await waitFor('the messages the old worker left', () => seen.length >= expected.length);
  for (let seq = 75; seq < 100; seq++) await bus.publish(Ticked, { key: 'k0', seq });
  await waitFor('the messages published since', () => seen.length >= expected.length + 25);
  await sleep(300);
  assert.deepEqual(
    [...seen].sort((a, b) => a - b),
    [...expected, ...Array.from({ length: 25 }, (_, i) => (75 + i) * 4)].sort((a, b) => a - b),
    'each once, none the old worker handled',
  );
  const floors = await sql<{ n: number }>(`select count(*)::int as n from "${schema}".cursors where done_next_xid is not null`);
  assert.equal(floors[0]!.n, 2, 'both cursors record a floor now');
});
