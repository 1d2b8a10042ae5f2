/**
 * The same bus on embedded PostgreSQL (PGlite, in process): what `npm start` runs on. One PGlite instance,
 * a schema per test.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { PGlite } from '@electric-sql/pglite';
import { pgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { waitFor } from './helpers.ts';

let db: PGlite;
before(async () => {
  db = await PGlite.create();
});
after(async () => {
  await db.close();
});

test('publish in a transaction, consume in per-key order, effects through ctx.tx exactly once', async (t) => {
  const world = (await pgWorld(t, 'e', { pglite: db }))!;
  const { schema } = world;
  const bus = world.bus('embedded');
  let failedOnce = false;
  bus.subscribe(
    'embedded-orders',
    Ticked,
    async (message, ctx) => {
      await ctx.tx.query(`insert into ${schema}.effects (message_id, key, seq) values ($1, $2, $3)`, [message.id, message.data.key, message.data.seq]);
      if (message.data.seq === 5 && !failedOnce) {
        failedOnce = true;
        throw new Error('fails once after writing');
      }
    },
    { retry: { immediate: 1, delayed: [] } },
  );
  await bus.start();
  await db.query(`create table ${schema}.effects (n serial primary key, message_id text unique not null, key text not null, seq int not null)`);
  await assert.rejects(
    bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'gone', seq: 0 }, { tx });
      throw new Error('rolled back');
    }),
  );
  for (let seq = 0; seq < 10; seq++) {
    await bus.transaction(async (tx) => {
      await bus.publishMany(
        Ticked,
        [
          { key: 'a', seq },
          { key: 'b', seq },
        ],
        { tx },
      );
    });
  }
  const effects = async () => (await db.query<{ key: string; seq: number }>(`select key, seq from ${schema}.effects order by n`)).rows;
  await waitFor('20 effects', async () => (await effects()).length === 20);
  const rows = await effects();
  const expected = Array.from({ length: 10 }, (_, seq) => seq);
  assert.deepEqual(
    rows.filter((row) => row.key === 'a').map((row) => row.seq),
    expected,
    'key a in order, once each',
  );
  assert.deepEqual(
    rows.filter((row) => row.key === 'b').map((row) => row.seq),
    expected,
    'key b in order, once each',
  );
  assert.ok(failedOnce, 'the failure happened, and its write was rolled back');
});

test('an always-failing message goes to dead letters and the rest keep flowing', async (t) => {
  const world = (await pgWorld(t, 'e', { pglite: db }))!;
  const { schema } = world;
  const bus = world.bus('embedded');
  const handled: number[] = [];
  bus.subscribe(
    'embedded-dead',
    Ticked,
    (message) => {
      if (message.data.note === 'poison') throw new Error('poison');
      handled.push(message.data.seq);
    },
    { retry: { immediate: 1, delayed: [50], jitter: 0 } },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 1, note: 'poison' });
  await bus.publish(Ticked, { key: 'k', seq: 2 });
  await bus.publish(Ticked, { key: 'other', seq: 3 });
  await waitFor('both good messages', () => handled.length === 2);
  assert.deepEqual(handled.sort(), [2, 3]);
  // Written by the acknowledgement of the dead letter's batch, which may commit after seq 2's handler ran.
  const deadLetters = async () => (await db.query<{ reason: string; attempts: unknown[] }>(`select reason, attempts from ${schema}.dead_letters`)).rows;
  await waitFor('the dead letter committed', async () => (await deadLetters()).length > 0);
  const rows = await deadLetters();
  assert.equal(rows.length, 1);
  assert.equal(rows[0]!.attempts.length, 3);
  assert.match(rows[0]!.reason, /failed 3 attempts; last error: poison/);
});
