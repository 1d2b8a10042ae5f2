/**
 * A copy of a message (a publish retried with the same id) that commits while its original's batch is
 * being acknowledged must be handled once (inbox). A consumer that reads ahead while the acknowledgement
 * commits cannot see the inbox records it is writing: this test caught that when such a read-ahead was
 * tried (commit 695fa66, reverted: no latency gain measured, more reads per event).
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { keyHash } from '../src/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, sleep, waitFor } from './helpers.ts';
import { pgWorld } from './fixtures/bus.ts';

/** A schema, a bus on it and a client of the test's own; undefined (skipped) without PostgreSQL. */
async function setup(t: TestContext, prefix: string) {
  const world = await pgWorld(t, prefix);
  if (world === undefined) return undefined;
  const { schema } = world;
  const bus = world.bus('inbox-ack');
  const db = await connect();
  t.after(() => db.end());
  return { schema, bus, db };
}

test('a copy committed while its original is being acknowledged is read ahead, and handled once (inbox)', { timeout: 30_000 }, async (t) => {
  const setUp = await setup(t, 'ia');
  if (setUp === undefined) return;
  const { schema, bus, db } = setUp;
  const handled: string[] = [];
  let copied = false;
  bus.subscribe(
    'once',
    Ticked,
    async (message) => {
      handled.push(`${message.id}:${message.data.seq}`);
      if (message.id !== 'copied' || copied) return;
      copied = true;
      // The copy commits during this batch, from another connection, and its NOTIFY wakes the consumer
      // before the handler returns: the next read starts as this batch's acknowledgement is sent.
      await db.query(
        `insert into "${schema}".log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         values ('test.ticked', 'copied', 'test.ticked.v1', 'test', now(), 'a', $1, 'copied', '{"key":"a","seq":1}'::jsonb)`,
        [keyHash('a')],
      );
      await db.query('select pg_notify($1, $2)', [schema, 'test.ticked']);
      await sleep(100);
    },
    { partitions: 1, inbox: true },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1 }, { id: 'copied' });
  await waitFor('the original', () => copied);
  await bus.publish(Ticked, { key: 'a', seq: 2 });
  await waitFor('the message after the copy', () => handled.some((h) => h.endsWith(':2')));
  await sleep(200);
  t.diagnostic(JSON.stringify(handled));
  assert.deepEqual(
    handled.filter((h) => h.startsWith('copied')),
    ['copied:1'],
    'the copy is not handled again',
  );
  const { rows } = await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".log where id = 'copied'`);
  assert.equal(rows[0]!.n, 2, 'both copies are in the log');
});

test('an id another worker records while its batch is handled: the acknowledgement is sent again without it, and the batch is not read again', {
  timeout: 30_000,
}, async (t) => {
  const setUp = await setup(t, 'ib');
  if (setUp === undefined) return;
  const { schema, bus, db } = setUp;
  // Batches of 3: 'first-taken' is in a full batch (acknowledged while the next one, read ahead, is handled),
  // 'last-taken' in the last, partial one (acknowledged before the next read).
  const ids = ['m1', 'first-taken', 'm2', 'm3', 'm4', 'm5', 'm6', 'last-taken'];
  const handled: string[] = [];
  bus.subscribe(
    'once',
    Ticked,
    async (message) => {
      handled.push(message.id);
      if (!message.id.endsWith('-taken')) return;
      // As a worker holding a copy of this message on another lane would: its record commits first.
      await db.query(`insert into "${schema}".inbox (subscription, message_id) select name, $1 from "${schema}".subscriptions`, [message.id]);
    },
    { partitions: 1, batchSize: 3, inbox: true, startFrom: 'beginning' },
  );
  await bus.transaction(async (tx) => {
    for (const [seq, id] of ids.entries()) await bus.publish(Ticked, { key: 'a', seq }, { tx, id });
  });
  await bus.start();
  await waitFor('the whole backlog', () => handled.includes('last-taken'));
  await bus.publish(Ticked, { key: 'a', seq: ids.length }, { id: 'after' });
  await waitFor('the message after it', () => handled.includes('after'));
  await sleep(200);
  t.diagnostic(JSON.stringify(handled));
  assert.deepEqual(handled, [...ids, 'after'], 'each message handled once, in order');
  const { rows } = await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".inbox`);
  assert.equal(rows[0]!.n, ids.length + 1, 'one inbox record per message');
});
