/**
 * `bus.transaction()` on a PostgreSQL server: BEGIN travels with the first statement, the transaction's
 * messages are written by one statement that travels with COMMIT, and a transaction that only publishes
 * is that one statement alone. These tests hold the outcome to what a transaction promises, however few
 * round trips it takes: everything or nothing, errors surfaced, with a pipelining pool (ours) and without
 * (one the caller gives).
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import pg from 'pg';
import { TidingsError } from '../src/index.ts';
import { pgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, DATABASE_URL, sleep, sql, waitFor } from './helpers.ts';

type Pooling = 'own pool (pipelined)' | 'caller pool (not pipelined)';
const POOLINGS: Pooling[] = ['own pool (pipelined)', 'caller pool (not pipelined)'];

async function setup(t: TestContext, pooling: Pooling) {
  const world = await pgWorld(t, 'tx');
  if (world === undefined) return undefined;
  const { schema } = world;
  let pool: pg.Pool | undefined;
  if (pooling === 'caller pool (not pipelined)') {
    pool = new pg.Pool({ connectionString: DATABASE_URL, max: 6 });
    // After the world's own clean-up, which stops the bus that uses the pool.
    t.after(() => pool!.end().catch(() => undefined));
  }
  const bus = world.bus('tx-test', pool === undefined ? {} : { pool });
  const seen: string[] = [];
  bus.subscribe('seen', Ticked, (message) => {
    seen.push(`${message.data.key}:${message.data.seq}`);
  });
  await bus.start();
  await bus.transaction(async (tx) => {
    await tx.query(`create table ${schema}.orders (id text primary key, total int not null check (total >= 0))`);
  });
  const orders = async () => (await sql<{ id: string }>(`select id from ${schema}.orders order by id`)).map((row) => row.id);
  const logged = async () => Number((await sql<{ n: string }>(`select count(*) as n from ${schema}.log`))[0]!.n);
  return { schema, bus, seen, orders, logged };
}

for (const pooling of POOLINGS) {
  test(`${pooling}: a write and its events commit together, each key's in the order published; nothing when the callback throws`, async (t) => {
    const s = await setup(t, pooling);
    if (s === undefined) return;
    const { schema, bus, seen, orders } = s;
    // Only publishes: one statement, committed on its own.
    await bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'a', seq: 1 }, { tx });
      await bus.publishMany(
        Ticked,
        [
          { key: 'a', seq: 2 },
          { key: 'a', seq: 3 },
        ],
        { tx },
      );
    });
    // A write first (BEGIN goes with it), then events (they go with COMMIT).
    await bus.transaction(async (tx) => {
      await tx.query(`insert into ${schema}.orders (id, total) values ('o1', 10)`);
      await bus.publish(Ticked, { key: 'b', seq: 1 }, { tx });
    });
    // Events first, then a write: the events are still written with the commit.
    await bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'c', seq: 1 }, { tx });
      await tx.query(`insert into ${schema}.orders (id, total) values ('o2', 20)`);
    });
    // Rolled back: the callback throws after publishing and writing.
    await assert.rejects(
      bus.transaction(async (tx) => {
        await tx.query(`insert into ${schema}.orders (id, total) values ('o3', 30)`);
        await bus.publish(Ticked, { key: 'rolled-back', seq: 1 }, { tx });
        throw new Error('changed my mind');
      }),
      /changed my mind/,
    );
    // Rolled back: only publishes, then a throw (no statement was ever sent).
    await assert.rejects(
      bus.transaction(async (tx) => {
        await bus.publish(Ticked, { key: 'rolled-back', seq: 2 }, { tx });
        throw new Error('nothing sent');
      }),
      /nothing sent/,
    );
    await waitFor('5 messages', () => seen.length >= 5);
    await sleep(300); // a rolled-back message would have arrived by now
    // Keys are handled in parallel: order holds within each key.
    assert.deepEqual([...seen].sort(), ['a:1', 'a:2', 'a:3', 'b:1', 'c:1']);
    assert.deepEqual(
      seen.filter((entry) => entry.startsWith('a:')),
      ['a:1', 'a:2', 'a:3'],
    );
    assert.deepEqual(await orders(), ['o1', 'o2']);
  });

  test(`${pooling}: a failed statement whose error the callback catches rolls everything back and says so (ROLLED_BACK)`, async (t) => {
    const s = await setup(t, pooling);
    if (s === undefined) return;
    const { schema, bus, orders, logged } = s;
    const attempt = bus.transaction(async (tx) => {
      await tx.query(`insert into ${schema}.orders (id, total) values ('kept?', 1)`);
      await bus.publish(Ticked, { key: 'k', seq: 1 }, { tx });
      await tx.query(`insert into ${schema}.orders (id, total) values ('negative', -1)`).catch(() => undefined); // check violation, swallowed
      return 'returned normally';
    });
    await assert.rejects(attempt, (error: unknown) => error instanceof TidingsError && error.code === 'ROLLED_BACK');
    assert.deepEqual(await orders(), []);
    assert.equal(await logged(), 0);
    // The connection went back to the pool in a usable state.
    await bus.transaction(async (tx) => {
      await tx.query(`insert into ${schema}.orders (id, total) values ('after', 1)`);
      await bus.publish(Ticked, { key: 'k', seq: 2 }, { tx });
    });
    assert.deepEqual(await orders(), ['after']);
    assert.equal(await logged(), 1);
  });

  test(`${pooling}: when the events' insert fails at commit, the transaction's writes are rolled back and the error reaches the caller`, async (t) => {
    const s = await setup(t, pooling);
    if (s === undefined) return;
    const { schema, bus, seen, orders, logged } = s;
    // Another session locks the log, so the insert that travels with COMMIT times out.
    const locker = await connect();
    await locker.query('begin');
    await locker.query(`lock table ${schema}.log in access exclusive mode`);
    const attempt = bus.transaction(async (tx) => {
      await tx.query(`set local lock_timeout = '200ms'`);
      await tx.query(`insert into ${schema}.orders (id, total) values ('o1', 1)`);
      await bus.publish(Ticked, { key: 'locked-out', seq: 1 }, { tx });
    });
    await assert.rejects(attempt, /lock timeout/);
    await locker.query('rollback');
    await locker.end();
    assert.deepEqual(await orders(), []);
    assert.equal(await logged(), 0);
    // And the next transaction goes through on the same pool.
    await bus.transaction(async (tx) => {
      await tx.query(`insert into ${schema}.orders (id, total) values ('o2', 2)`);
      await bus.publish(Ticked, { key: 'after', seq: 1 }, { tx });
    });
    await waitFor('the later message', () => seen.length >= 1);
    assert.deepEqual(seen, ['after:1']);
    assert.deepEqual(await orders(), ['o2']);
  });

  test(`${pooling}: 10 concurrent producers, 2,000 transactions with a write and an event each: every pair once, none without the other`, async (t) => {
    const s = await setup(t, pooling);
    if (s === undefined) return;
    const { schema, bus, seen, orders } = s;
    const total = 2_000;
    let next = 0;
    await Promise.all(
      Array.from({ length: 10 }, async () => {
        while (next < total) {
          const seq = next++;
          // Every 10th transaction fails after both statements: neither may appear.
          await bus
            .transaction(async (tx) => {
              await tx.query(`insert into ${schema}.orders (id, total) values ($1, $2)`, [`o${seq}`, seq]);
              await bus.publish(Ticked, { key: `k${seq % 50}`, seq }, { tx });
              if (seq % 10 === 9) throw new Error('fail on purpose');
            })
            .catch((error: unknown) => {
              if (!(error instanceof Error) || error.message !== 'fail on purpose') throw error;
            });
        }
      }),
    );
    const expected = Array.from({ length: total }, (_, seq) => seq).filter((seq) => seq % 10 !== 9);
    await waitFor(`${expected.length} messages`, () => seen.length >= expected.length, 30_000);
    await sleep(300);
    const handled = seen.map((entry) => Number(entry.split(':')[1])).sort((a, b) => a - b);
    assert.deepEqual(handled, expected);
    assert.deepEqual(
      (await orders()).map((id) => Number(id.slice(1))).sort((a, b) => a - b),
      expected,
    );
  });

  test(`${pooling}: a publishMany of 1,000 written in chunks as it is encoded keeps the transaction's order and atomicity`, async (t) => {
    const s = await setup(t, pooling);
    if (s === undefined) return;
    const { schema, bus, seen, orders, logged } = s;
    const many = (from: number, n: number, extra: Record<string, unknown> = {}) =>
      Array.from({ length: n }, (_, i) => ({ key: `k${(from + i) % 7}`, seq: from + i, ...(i === n - 100 ? extra : {}) }));
    // Publishes before and after the chunked one: one key's messages stay in publication order.
    await bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'k0', seq: 0 }, { tx });
      await tx.query(`insert into ${schema}.orders (id, total) values ('bulk', 1)`);
      await bus.publishMany(Ticked, many(1, 1_000), { tx });
      await bus.publish(Ticked, { key: 'k0', seq: 1_001 }, { tx });
    });
    await waitFor('1,002 messages', () => seen.length >= 1_002, 20_000);
    for (let key = 0; key < 7; key++) {
      const seqs = seen.filter((entry) => entry.startsWith(`k${key}:`)).map((entry) => Number(entry.split(':')[1]));
      assert.deepEqual(
        seqs,
        [...seqs].sort((a, b) => a - b),
        `key k${key} in publication order`,
      );
    }
    assert.equal(seen.length, 1_002);

    // A message that cannot be stored, 900th of 1,000: refused after the first chunks were sent. The
    // callback catches the error; the commit must then fail, writing nothing.
    const before = await logged();
    const failed = await bus
      .transaction(async (tx) => {
        await tx.query(`insert into ${schema}.orders (id, total) values ('partial', 1)`);
        const refused = await bus.publishMany(Ticked, many(2_000, 1_000, { note: 'nul \u0000 here' }), { tx }).catch((error: unknown) => error);
        assert.ok(refused instanceof TidingsError && refused.code === 'INVALID_PAYLOAD', String(refused));
      })
      .catch((error: unknown) => error);
    assert.ok(failed instanceof TidingsError, String(failed));
    assert.equal(failed.code, 'ROLLED_BACK');
    assert.match(failed.message, /part of its messages were written/);

    // A schema error in the 900th is found before anything is written: the transaction goes on and commits.
    await bus.transaction(async (tx) => {
      await tx.query(`insert into ${schema}.orders (id, total) values ('after-invalid', 1)`);
      const invalid = await bus.publishMany(Ticked, many(3_000, 1_000, { seq: 'not a number' }), { tx }).catch((error: unknown) => error);
      assert.equal((invalid as TidingsError).name, 'ValidationError');
    });
    assert.equal(await logged(), before);
    assert.deepEqual(await orders(), ['after-invalid', 'bulk']);
  });
}

/** Text COPY's format treats specially (its escapes, delimiters, null marker, end marker), and some that it does not. */
const HOSTILE = ['tab\there', 'new\nline', 'cr\rlf\r\n', 'back\\slash', '\\N', '\\.', 'end\\', '\\\\t', '\\', 'emoji 🎉 ü', `quote " ' ,;`, '\u2028sep', ' '];

for (const pooling of POOLINGS) {
  test(`${pooling}: a large publishMany (streamed with COPY) stores hostile text exactly, and statements issued meanwhile keep their order`, async (t) => {
    const s = await setup(t, pooling);
    if (s === undefined) return;
    const { schema, bus, orders } = s;
    // The tenant is held to tenant ids (no control characters, backslashes or quotes: docs/tenancy.md); the other attributes carry COPY's escapes.
    const options = { subject: '\\N', tenant: 'tenänt:€-1', correlationId: 'corr\nid\\.', causationId: '\\' };
    const items = Array.from({ length: 900 }, (_, i) => ({ key: `${HOSTILE[i % HOSTILE.length]}#${i}`, seq: i, note: HOSTILE[(i + 3) % HOSTILE.length]! }));
    let writes = 0;
    await bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'first', seq: -1 }, { tx });
      let done = false;
      const publishing = bus.publishMany(Ticked, items, { tx, ...options }).finally(() => {
        done = true;
      });
      // Statements issued while the messages stream, three per turn of the event loop without waiting for
      // those before: each waits its turn, none disturbs the COPY.
      const statements: Array<Promise<unknown>> = [];
      while (!done) {
        for (let i = 0; i < 3; i++)
          statements.push(tx.query(`insert into ${schema}.orders (id, total) values ($1, 1)`, [`w${String(writes++).padStart(4, '0')}`]));
        await new Promise(setImmediate);
      }
      await Promise.all([publishing, ...statements]);
      await bus.publish(Ticked, { key: 'last', seq: 900 }, { tx });
    });
    assert.ok(writes >= 1);
    assert.equal((await orders()).length, writes);

    const client = await connect();
    try {
      const { rows } = await client.query<Record<string, string | null> & { data: { key: string; seq: number; note?: string } }>(
        `select key, subject, tenant, correlation_id, causation_id, data from ${schema}.log order by position`,
      );
      assert.equal(rows.length, 902);
      assert.deepEqual(
        rows.map((row) => row.data.seq),
        [-1, ...items.map((item) => item.seq), 900],
        'stored in publication order',
      );
      rows.slice(1, -1).forEach((row, i) => {
        assert.deepEqual(row.data, items[i], `data of message ${i}`);
        assert.equal(row.key, items[i]!.key, `key of message ${i}`);
        assert.deepEqual(
          [row.subject, row.tenant, row.correlation_id, row.causation_id],
          [options.subject, options.tenant, options.correlationId, options.causationId],
          `attributes of message ${i}`,
        );
      });
    } finally {
      await client.end();
    }
  });
}

test('a COPY the server fails mid-stream rolls its transaction back, and the pool connection that ran it serves later transactions', async (t) => {
  const world = await pgWorld(t, 'tx');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus('tx-test', { poolSize: 2 });
  await bus.start();
  const items = (from: number, n: number) => Array.from({ length: n }, (_, i) => ({ key: `k${i % 10}`, seq: from + i, note: 'x'.repeat(200) }));
  for (let round = 0; round < 3; round++) {
    const failed = await bus
      .transaction(async (tx) => {
        // The server cancels the COPY after 1 ms, while it streams.
        await tx.query(`set local statement_timeout = 1`);
        await bus.publishMany(Ticked, items(0, 20_000), { tx });
      })
      .catch((error: unknown) => error);
    assert.match(String((failed as Error).message), /statement timeout/, String(failed));
  }
  for (let round = 0; round < 6; round++) {
    await bus.transaction(async (tx) => {
      await tx.query('select 1');
      await bus.publishMany(Ticked, items(round * 300, 300), { tx });
    });
  }
  const client = await connect();
  try {
    const { rows } = await client.query<{ seq: number }>(`select (data->>'seq')::int as seq from ${schema}.log order by position`);
    assert.deepEqual(
      rows.map((row) => row.seq),
      Array.from({ length: 1_800 }, (_, i) => i),
    );
  } finally {
    await client.end();
  }
});
