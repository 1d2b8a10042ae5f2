/**
 * The guarantees of DESIGN.md on PostgreSQL specifically, against a real server; each test has its own
 * schema. What every backbone promises (concurrency per key, exactly-once effects, graceful stop, redrive)
 * is in the conformance suite (test/conformance/suite.ts); here are the PostgreSQL cases: transactions the
 * caller drives, commit order against positions, long transactions, worker processes and kill -9.
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { z } from 'zod';
import { deadLetter, defineEvent, PermanentError } from '../src/index.ts';
import { Ticked, ticksSeen, Tocked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { startProcess, type TestProcess } from './fixtures/processes.ts';
import { connect, createEffects, sleep, sql, waitFor } from './helpers.ts';

test('1. atomic publish in a transaction the caller drives on its own connection', async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const bus = world.bus();
  const seen: string[] = [];
  bus.subscribe('atomic', Ticked, (message) => {
    seen.push(`${message.data.key}:${message.data.seq}`);
  });
  await bus.start();
  const client = await connect();
  await client.query('begin');
  await bus.publish(Ticked, { key: 'rolled-back', seq: 1 }, { tx: client });
  await client.query('rollback');
  await client.query('begin');
  await bus.publish(Ticked, { key: 'committed', seq: 1 }, { tx: client });
  await client.query('commit');
  await client.end();
  await waitFor('the committed message', () => seen.length >= 1);
  await sleep(300); // a rolled-back message would have arrived by now
  assert.deepEqual(seen, ['committed:1']);
});

test('2. no skipped messages: 8 publishers committing out of order, 5,000 messages, consumers reading throughout', async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus();
  const seen = new Map<string, number>();
  bus.subscribe(
    'all-of-them',
    Ticked,
    (message) => {
      seen.set(message.id, (seen.get(message.id) ?? 0) + 1);
    },
    { batchSize: 100 },
  );
  await bus.start();

  const committed = new Set<string>();
  const publishers = 8;
  const perPublisher = 625;
  const client = await connect();
  await Promise.all(
    Array.from({ length: publishers }, async (_, p) => {
      for (let i = 0; i < perPublisher; ) {
        // Several messages per transaction, and a random pause between the insert and the commit, so
        // transactions that took their positions early often commit late.
        const n = Math.min(1 + Math.floor(Math.random() * 10), perPublisher - i);
        const ids = await bus.transaction(async (tx) => {
          const published = await bus.publishMany(
            Ticked,
            Array.from({ length: n }, (_, j) => ({ key: `p${p}`, seq: i + j })),
            { tx },
          );
          await sleep(Math.random() * 15);
          return published.map((m) => m.id);
        });
        for (const id of ids) committed.add(id);
        i += n;
      }
    }),
  );
  // A long transaction that published first and commits last: the classic skipped row.
  await client.query('begin');
  const [late] = await bus.publishMany(Ticked, [{ key: 'late', seq: 0 }], { tx: client });
  const early = await bus.publish(Ticked, { key: 'early', seq: 0 });
  await waitFor('the early message, committed after the late one took its position', () => seen.has(early.id));
  await client.query('commit');
  const { rows } = await client.query(`select id, position::int8 as position from "${schema}".log where id = any($1)`, [[late!.id, early.id]]);
  await client.end();
  const position = new Map(rows.map((row: { id: string; position: string }) => [row.id, Number(row.position)]));
  // A reader keeping "the highest position I have seen" was already past the late row when it committed.
  assert.ok(position.get(late!.id)! < position.get(early.id)!, 'the late message has the lower position');
  committed.add(late!.id);
  committed.add(early.id);

  assert.equal(committed.size, publishers * perPublisher + 2);
  await waitFor('every committed message', () => [...committed].every((id) => seen.has(id)), 30_000);
  const duplicates = [...seen.values()].filter((count) => count > 1).length;
  assert.equal(duplicates, 0, 'no message handled twice');
});

test('2b. an unrelated long-running transaction does not hold back delivery', async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const bus = world.bus();
  const seen = await ticksSeen(bus, 'not-blocked');
  const idle = await connect();
  await idle.query('begin');
  await idle.query('select pg_current_xact_id()'); // holds the xmin horizon back
  const started = Date.now();
  for (let seq = 0; seq < 20; seq++) await bus.publish(Ticked, { key: 'k', seq });
  await waitFor('delivery while another transaction stays open', () => seen.length === 20, 5_000);
  t.diagnostic(`20 messages delivered in ${Date.now() - started} ms while a transaction stayed open`);
  await idle.query('rollback');
  await idle.end();
  assert.deepEqual(
    seen,
    Array.from({ length: 20 }, (_, i) => i),
  );
});

test('2c. a large window is read in bounded ranges: a rare topic among many others, small batches, nothing missed', async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const publisher = world.bus();
  await publisher.start();
  const Other = defineEvent('test.other', { schema: z.object({ n: z.number() }) });
  const expected: number[] = [];
  for (let chunk = 0; chunk < 10; chunk++) {
    await publisher.transaction(async (tx) => {
      await publisher.publishMany(
        Other,
        Array.from({ length: 500 }, (_, n) => ({ n })),
        { tx },
      );
      const seq = chunk * 3;
      await publisher.publishMany(
        Ticked,
        [0, 1, 2].map((i) => ({ key: 'rare', seq: seq + i })),
        { tx },
      );
      expected.push(seq, seq + 1, seq + 2);
    });
  }
  const bus = world.bus();
  const seen: number[] = [];
  bus.subscribe(
    'rare-reader',
    Ticked,
    (message) => {
      seen.push(message.data.seq);
    },
    { startFrom: 'beginning', batchSize: 2, partitions: 2 },
  );
  await bus.start();
  await waitFor('all 30 rare messages', () => seen.length >= 30);
  assert.deepEqual(seen, expected);
});

function effects(schema: string): Promise<Array<{ message_id: string; key: string; seq: number; worker: number }>> {
  return sql(`select message_id, key, seq, worker from "${schema}".effects order by n`);
}

/** A schema of its own with the effects table the worker processes (fixtures/worker.ts) write, and a publisher started. */
async function workersWorld(t: TestContext) {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return undefined;
  await createEffects(world.schema);
  const publisher = world.bus('publisher');
  await publisher.start();
  return { world, schema: world.schema, publisher };
}

test('3. per-key order with two worker processes and 50 keys; keys run in parallel', async (t) => {
  const ready = await workersWorld(t);
  if (ready === undefined) return;
  const { schema, publisher } = ready;
  const first = await startProcess('worker', { SCHEMA: schema, HANDLE_MS: '1' });
  const keys = 50;
  const perKey = 40;
  // Each key's messages are committed one after another by one publisher; 10 publishers run at once.
  const publish = (from: number, to: number) =>
    Promise.all(
      Array.from({ length: 10 }, async (_, p) => {
        for (let seq = from; seq < to; seq++) {
          for (let k = p; k < keys; k += 10) {
            await publisher.transaction(async (tx) => {
              await publisher.publish(Ticked, { key: `key-${k}`, seq }, { tx });
            });
          }
        }
      }),
    );
  const publishing = publish(0, perKey / 2);
  await sleep(300);
  const second = await startProcess('worker', { SCHEMA: schema, HANDLE_MS: '1' });
  await publishing;
  // The second half once both hold partitions: a first worker fast enough to handle the first half alone
  // must still share the rest (the per-key order across the hand-over is what this test is for).
  await waitFor('both workers hold partitions', async () => {
    const [row] = await sql<{ owners: string }>(`select count(distinct owner) as owners from "${schema}".cursors where owner is not null`);
    return Number(row?.owners) === 2;
  });
  await publish(perKey / 2, perKey);
  try {
    await waitFor('all messages handled', async () => (await effects(schema)).length >= keys * perKey, 60_000);
    const rows = await effects(schema);
    assert.equal(rows.length, keys * perKey, 'each message handled exactly once (effects through ctx.tx)');
    const byKey = new Map<string, number[]>();
    for (const row of rows) byKey.set(row.key, [...(byKey.get(row.key) ?? []), row.seq]);
    for (const [key, seqs] of byKey) {
      assert.deepEqual(
        seqs,
        Array.from({ length: perKey }, (_, i) => i),
        `order of ${key}`,
      );
    }
    const workers = new Set(rows.map((row) => row.worker));
    assert.equal(workers.size, 2, 'both worker processes handled messages');
  } finally {
    await Promise.all([first.stop(), second.stop()]);
  }
});

test('3b. a rolling deploy across processes, both ways: adding a topic (its first new worker killed -9 midway), then removing it; each message once, in key order', async (t) => {
  const ready = await workersWorld(t);
  if (ready === undefined) return;
  const { schema, publisher } = ready;
  const both = `${Ticked.topic},${Tocked.topic}`;
  const workers: TestProcess[] = [];
  const start = async (topics: string) => {
    const child = await startProcess('worker', { SCHEMA: schema, TOPICS: topics, HANDLE_MS: '1' });
    workers.push(child);
    return child;
  };
  const published = new Map<string, 'E' | 'F'>();
  const publish = async (from: number, count: number, during?: (seq: number) => Promise<void>) => {
    for (let seq = from; seq < from + count; seq++) {
      const contract = seq % 2 === 0 ? Ticked : Tocked;
      const { id } = await publisher.publish(contract, { key: `k${seq % 10}`, seq });
      published.set(id, seq % 2 === 0 ? 'E' : 'F');
      if (seq % 20 === 19) await sleep(100);
      await during?.(seq);
    }
  };
  try {
    const old = await start(Ticked.topic);
    let first = await start(both);
    const firstPid = first.pid;
    let second: TestProcess | undefined;
    // Adding: half way, the only new worker dies; the old one must hold F's partitions, not skip them.
    await publish(0, 200, async (seq) => {
      if (seq !== 100) return;
      first.kill();
      await sleep(1_500);
      second = await start(both);
    });
    await waitFor('every message of the deploy', async () => (await effects(schema)).length >= 200, 60_000);
    await old.stop();
    let rows = await effects(schema);
    assert.equal(rows.length, 200, 'each message once (effects commit with the acknowledgement)');
    assert.equal(new Set(rows.map((row) => row.message_id)).size, 200);
    const newPids = new Set([firstPid, second!.pid]);
    const fByOld = rows.filter((row) => published.get(row.message_id) === 'F' && !newPids.has(row.worker));
    assert.deepEqual(fByOld, [], 'every F handled by a worker with its handler');
    for (let k = 0; k < 10; k++) {
      const seqs = rows.filter((row) => row.key === `k${k}`).map((row) => row.seq);
      assert.deepEqual(
        seqs,
        [...seqs].sort((a, b) => a - b),
        `order of k${k}`,
      );
    }

    // Removing: a worker without F starts beside the one with it; F is handled by the latter while it runs.
    const newest = await start(Ticked.topic);
    await publish(200, 40);
    await waitFor('the messages while both run', async () => (await effects(schema)).length >= 240, 60_000);
    rows = await effects(schema);
    assert.deepEqual(
      rows.filter((row) => published.get(row.message_id) === 'F' && row.worker === newest.pid),
      [],
      'the worker without F handled no F',
    );
    await second!.stop();
    first = newest;
    await publish(240, 20);
    await waitFor('the E messages after the deploy', async () => (await effects(schema)).filter((row) => row.seq >= 240).length >= 10, 60_000);
    await sleep(500);
    rows = await effects(schema);
    assert.deepEqual(
      rows.filter((row) => row.seq >= 240).map((row) => row.seq % 2),
      Array(10).fill(0),
      "after it, only E is the subscription's",
    );
    assert.equal(await publisher.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
  } finally {
    await Promise.all(workers.map((worker) => worker.stop()));
  }
});

test('4. retries follow the schedule; an always-failing message is dead-lettered with its attempts; a held key holds only itself', async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus();
  const attempts = new Map<string, number[]>();
  const order: string[] = [];
  bus.subscribe(
    'flaky',
    Ticked,
    (message) => {
      const id = `${message.data.key}:${message.data.seq}`;
      attempts.set(id, [...(attempts.get(id) ?? []), Date.now()]);
      if (message.data.note === 'fail-twice' && attempts.get(id)!.length <= 2) throw new Error(`transient failure of ${id}`);
      if (message.data.note === 'always') throw new Error(`${id} always fails`);
      if (message.data.note === 'permanent') throw new PermanentError('cannot ever work');
      if (message.data.note === 'give-up') return deadLetter('handler gave up');
      order.push(id);
      return undefined;
    },
    { retry: { immediate: 1, delayed: [300, 600], jitter: 0 }, partitions: 1 },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1, note: 'fail-twice' });
  await bus.publish(Ticked, { key: 'a', seq: 2 });
  await bus.publish(Ticked, { key: 'b', seq: 1 });
  await bus.publish(Ticked, { key: 'c', seq: 1, note: 'always' });
  await bus.publish(Ticked, { key: 'c', seq: 2 });
  await bus.publish(Ticked, { key: 'd', seq: 1, note: 'permanent' });
  await bus.publish(Ticked, { key: 'd', seq: 2, note: 'give-up' });
  await bus.publish(Ticked, { key: 'd', seq: 3 });

  await waitFor('a:2 and c:2 handled', () => order.includes('a:2') && order.includes('c:2'), 10_000);
  // a:1 failed twice (first attempt, one immediate retry), then succeeded 300 ms later; a:2 waited for it.
  const a1 = attempts.get('a:1')!;
  assert.equal(a1.length, 3);
  assert.ok(a1[1]! - a1[0]! < 250, 'the immediate retry ran at once');
  assert.ok(a1[2]! - a1[1]! >= 280, `the delayed retry waited 300 ms (waited ${a1[2]! - a1[1]!})`);
  assert.ok(order.indexOf('a:1') < order.indexOf('a:2'), 'a:2 after a:1');
  assert.ok(order.indexOf('b:1') < order.indexOf('a:1'), 'key b did not wait for key a');
  // c:1 used every attempt: 1 + 1 immediate + 2 delayed, then went to dead letters; c:2 followed it.
  assert.equal(attempts.get('c:1')!.length, 4);
  assert.equal(attempts.get('d:1')!.length, 1, 'a permanent error is not retried');
  assert.equal(attempts.get('d:2')!.length, 1, 'a handler that gives up is not retried');
  assert.ok(order.includes('d:3'));

  // c:2 ran in the transaction that dead-letters c:1: wait for it to commit.
  const client = await connect();
  const deadLetters = async () => (await client.query(`select message_id, topic, key, reason, attempts from "${schema}".dead_letters order by key, id`)).rows;
  await waitFor('three dead letters', async () => (await deadLetters()).length === 3);
  const rows = await deadLetters();
  await client.end();
  const [c1, d1, d2] = rows;
  assert.equal(c1.key, 'c');
  assert.equal(c1.attempts.length, 4);
  assert.match(c1.attempts[3].error.message, /c:1 always fails/);
  assert.ok(c1.attempts[3].error.stack.includes('guarantees.pg.test.ts'), 'the stack of each attempt is kept');
  assert.match(c1.reason, /failed 4 attempts/);
  assert.match(d1.reason, /permanent error: cannot ever work/);
  assert.match(d2.reason, /handler gave up/);
});

test('4b. retries in batches: more held keys than a pass takes, and a key with more messages behind it than a pass drains; each handled once, in key order', async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const bus = world.bus();
  const failed = new Set<string>();
  const handled: string[] = [];
  bus.subscribe(
    'held-batches',
    Ticked,
    (message) => {
      const id = `${message.data.key}:${message.data.seq}`;
      // The first message of each key fails once: its key waits for a delayed retry, the rest behind it.
      if (message.data.seq === 1 && !failed.has(id)) {
        failed.add(id);
        throw new Error(`first attempt of ${id}`);
      }
      handled.push(id);
      return undefined;
    },
    // A retry pass takes 5 keys, and 5 messages of each.
    { retry: { immediate: 0, delayed: [100], jitter: 0 }, partitions: 1, batchSize: 5 },
  );
  await bus.start();
  const keys = Array.from({ length: 12 }, (_, i) => `k${i}`);
  const messages = [
    ...keys.map((key) => ({ key, seq: 1 })),
    // Key k0 gets 23 more, behind its first message.
    ...Array.from({ length: 23 }, (_, i) => ({ key: 'k0', seq: i + 2 })),
    ...keys.slice(1).map((key) => ({ key, seq: 2 })),
  ];
  await bus.publishMany(Ticked, messages);
  await waitFor(`${messages.length} messages handled`, () => handled.length >= messages.length, 20_000);
  await sleep(300);
  assert.equal(handled.length, messages.length, 'each message handled once');
  assert.equal(new Set(handled).size, messages.length);
  for (const key of keys) {
    const seqs = handled.filter((id) => id.startsWith(`${key}:`)).map((id) => Number(id.split(':')[1]));
    assert.deepEqual(
      seqs,
      [...seqs].sort((a, b) => a - b),
      `key ${key} in order`,
    );
  }
  assert.equal(failed.size, keys.length, 'every key waited for a retry');
});

test('5b. kill -9 after the write, before the ack: the effect happens once, on the worker that takes over', async (t) => {
  const ready = await workersWorld(t);
  if (ready === undefined) return;
  const { schema, publisher } = ready;
  const doomed = await startProcess('worker', { SCHEMA: schema, CRASH_ON: 'k3:5' });
  const { exited } = doomed;
  await publisher.publishMany(
    Ticked,
    Array.from({ length: 200 }, (_, i) => ({ key: `k${i % 10}`, seq: Math.floor(i / 10) })),
  );
  assert.equal(await exited, 'SIGKILL');
  const heir = await startProcess('worker', { SCHEMA: schema });
  try {
    await waitFor('200 effects', async () => (await effects(schema)).length >= 200, 30_000);
    await sleep(300);
    const rows = await effects(schema);
    assert.equal(rows.length, 200, 'one effect per message, none from the killed attempt');
    assert.equal(new Set(rows.map((row) => row.message_id)).size, 200);
    const k3 = rows.filter((row) => row.key === 'k3').map((row) => row.seq);
    assert.deepEqual(
      k3,
      Array.from({ length: 20 }, (_, i) => i),
      'k3 still in order',
    );
  } finally {
    await heir.stop();
  }
});

test("6. bad input written behind Tidings' back: an undecodable row is dead-lettered and the consumer goes on", async (t) => {
  const world = await pgWorld(t, 'g');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus();
  const seen = await ticksSeen(bus, 'strict');

  // (Refusal at publish is in the conformance suite; here, rows a foreign writer put in the log.)
  await bus.publish(Ticked, { key: 'x', seq: 1 });
  // Rows written behind Tidings' back: data that breaks the schema, and data that is not an object at all.
  const client = await connect();
  for (const [id, data] of [
    ['corrupt-1', '{"key": "x", "seq": "not a number"}'],
    ['corrupt-2', '"just a string"'],
  ]) {
    await client.query(
      `insert into "${schema}".log (topic, id, type, source, time, key, key_hash, correlation_id, data)
       values ('test.ticked', $1, 'test.ticked.v1', 'psql', now(), 'x', 7, $1, $2::jsonb)`,
      [id, data],
    );
  }
  await client.end();
  await bus.publish(Ticked, { key: 'x', seq: 2 });
  await waitFor('the valid messages around the corrupt ones', () => seen.includes(2));
  assert.deepEqual(seen, [1, 2]);
  const check = await connect();
  // The dead letters are written by their batch's acknowledgement, which may commit after seq 2's handler ran.
  const deadLetters = async () => (await check.query(`select message_id, reason from "${schema}".dead_letters order by id`)).rows;
  await waitFor('both dead letters committed', async () => (await deadLetters()).length >= 2);
  const rows = await deadLetters();
  const { rows: logRows } = await check.query(`select count(*)::int as n from "${schema}".log`);
  await check.end();
  assert.deepEqual(
    rows.map((row) => row.message_id),
    ['corrupt-1', 'corrupt-2'],
  );
  for (const row of rows) assert.match(row.reason, /invalid payload/);
  assert.equal(logRows[0].n, 4, 'two published, two written by hand');
});
