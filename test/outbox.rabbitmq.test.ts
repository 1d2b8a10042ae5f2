/**
 * The inbox of a broker with a PostgreSQL outbox (src/postgres/lazy-transaction.ts), on RabbitMQ because it keeps every
 * copy of a message published twice (JetStream would de-duplicate the id itself). Handlers that never use
 * `ctx.tx` get no transaction: their ids are looked up and recorded by statements shared between
 * deliveries, and a copy of a handled message stops at the look-up. A handler that uses `ctx.tx` gets the
 * inbox record in its transaction, so a delivery that finds the id recorded meanwhile keeps none of its writes.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Ticked } from './fixtures/contracts.ts';
import { sleep, sql, waitFor } from './helpers.ts';
import { rabbitWorld } from './fixtures/rabbitmq.ts';

test('outbox inbox, handler without ctx.tx: 300 messages each published twice with one id, over 30 keys, handled once each, in key order, all recorded', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  // recentIds 0: the consumer's memory of handled ids would drop the copies before the inbox sees them.
  const bus = h.bus('plain', { outbox: true, relay: false, rabbit: { recentIds: 0 } });
  const runs = new Map<string, number>();
  const order = new Map<string, number[]>();
  bus.subscribe(
    'counter',
    Ticked,
    async (message) => {
      runs.set(message.id, (runs.get(message.id) ?? 0) + 1);
      order.set(message.data.key, [...(order.get(message.data.key) ?? []), message.data.seq]);
    },
    { concurrency: 16, partitions: 4 },
  );
  await bus.start();
  const keys = 30;
  const perKey = 10;
  for (let seq = 0; seq < perKey; seq++) {
    await Promise.all(
      Array.from({ length: keys }, async (_, k) => {
        const id = `dup-${k}-${seq}`;
        // Two publishes, one after the other: the broker holds two copies, in this order within the key.
        await bus.publish(Ticked, { key: `k${k}`, seq }, { id });
        await bus.publish(Ticked, { key: `k${k}`, seq }, { id });
      }),
    );
  }
  await waitFor('every message handled', () => runs.size === keys * perKey, 30_000);
  await sleep(500); // the second copies, had they not stopped at the inbox, would arrive meanwhile
  assert.deepEqual(
    [...runs.values()].filter((n) => n !== 1),
    [],
    'no message handled twice',
  );
  for (const [key, seqs] of order)
    assert.deepEqual(
      seqs,
      Array.from({ length: perKey }, (_, i) => i),
      `order of ${key}`,
    );
  const [row] = await sql<{ n: string }>(`select count(*) as n from ${h.schema}.inbox where subscription = 'counter'`);
  assert.equal(Number(row!.n), keys * perKey, 'every handled id recorded');
});

test('outbox inbox, handler writing through ctx.tx: when the id got recorded before its first statement, the delivery keeps no write and is not retried', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  const bus = h.bus('writer', { outbox: true, relay: false, rabbit: { recentIds: 0 } });
  let attempts = 0;
  let rejected: unknown;
  bus.subscribe('writer', Ticked, async (message, ctx) => {
    attempts++;
    // What a concurrent copy of this message would do after this delivery's look-up: record it first.
    if (message.data.seq === 1) await sql(`insert into ${h.schema}.inbox (subscription, message_id) values ('writer', $1)`, [message.id]);
    try {
      await ctx.tx.query(`insert into ${h.schema}.effects (id) values ($1)`, [message.id]);
    } catch (error) {
      rejected = error;
      throw error;
    }
  });
  await bus.start();
  await sql(`create table ${h.schema}.effects (id text primary key)`);
  await bus.publish(Ticked, { key: 'k', seq: 1 }, { id: 'raced' });
  await bus.publish(Ticked, { key: 'k', seq: 2 }, { id: 'alone' });
  await waitFor('both deliveries', () => attempts >= 2, 15_000);
  await sleep(1_500); // longer than a retry after a database failure (1 s)
  assert.equal(attempts, 2, 'the raced message was acknowledged, not retried');
  assert.ok(rejected !== undefined, "the raced delivery's statement was refused");
  const effects = await sql<{ id: string }>(`select id from ${h.schema}.effects order by id`);
  assert.deepEqual(
    effects.map((row) => row.id),
    ['alone'],
  );
  const inbox = await sql<{ message_id: string }>(`select message_id from ${h.schema}.inbox where subscription = 'writer' order by message_id`);
  assert.deepEqual(
    inbox.map((row) => row.message_id),
    ['alone', 'raced'],
  );
});
