/**
 * A subscription's workers on RabbitMQ (src/rabbitmq/consume/workers.ts): a rolling deploy that adds or removes a
 * handler while old and new workers run side by side (issue 18, defect 0), and several processes sharing the
 * partitions, one of them killed with -9.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { defineEvent, keyHash, type Bus } from '../src/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { assignPartitions } from '../src/rabbitmq/consume/workers.ts';
import { Ticked, Tocked } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, RABBITMQ_URL, sleep, waitFor } from './helpers.ts';
import { createWorkerTables, rabbitWorld, warnings, type Harness } from './fixtures/rabbitmq.ts';

const Noted = defineEvent('test.noted', { schema: z.object({ key: z.string(), seq: z.number().int() }), key: (data) => data.key });

/** Quick worker timings, so that the workers hear of each other in a few hundred ms. */
const quick = { workerHeartbeatMs: 200, workerTimeoutMs: 1_000 };

interface Handling {
  readonly worker: string;
  readonly id: string;
  readonly topic: string;
  readonly key: string;
  readonly seq: number;
  readonly attempt: number;
}

/** A worker of subscription `billing` that handles test.ticked, and test.noted too when `withNoted`. */
function billingWorker(h: Harness, name: string, withNoted: boolean, log: Handling[]): Bus<PgTransaction> {
  const bus = h.bus(name, { rabbit: quick });
  const record = (message: { id: string; topic: string; data: { key: string; seq: number } }, ctx: { attempt: number }) => {
    log.push({ worker: name, id: message.id, topic: message.topic, key: message.data.key, seq: message.data.seq, attempt: ctx.attempt });
  };
  const subscription = bus.subscription('billing', { partitions: 4, concurrency: 4 }).on(Ticked, record);
  if (withNoted) subscription.on(Noted, record);
  return bus;
}

/** Publishes ticked then noted, `rounds` times, for each of `keys` keys (keys in parallel, each in order). */
async function publishBoth(publisher: Bus<PgTransaction>, keys: number, rounds: number): Promise<string[][]> {
  return Promise.all(
    Array.from({ length: keys }, async (_, k) => {
      const order: string[] = [];
      for (let seq = 1; seq <= rounds; seq++) {
        await publisher.publish(Ticked, { key: `k${k}`, seq });
        order.push(`test.ticked:${seq}`);
        await publisher.publish(Noted, { key: `k${k}`, seq });
        order.push(`test.noted:${seq}`);
      }
      return order;
    }),
  );
}

function assertDeploy(log: readonly Handling[], expected: string[][], worker: string, total: number): void {
  const ids = new Map<string, number>();
  for (const handling of log) ids.set(handling.id, (ids.get(handling.id) ?? 0) + 1);
  assert.equal(ids.size, total, 'every message handled');
  assert.deepEqual(
    [...ids.values()].filter((n) => n > 1),
    [],
    'none twice',
  );
  // Messages a worker returned without starting them, as it handed a partition over, were not attempts.
  assert.deepEqual(
    log.filter((handling) => handling.attempt !== 1),
    [],
    'each on its first attempt',
  );
  const noted = log.filter((handling) => handling.topic === 'test.noted');
  assert.deepEqual([...new Set(noted.map((handling) => handling.worker))], [worker], `every test.noted by ${worker}, the worker with its handler`);
  expected.forEach((order, k) => {
    assert.deepEqual(
      log.filter((handling) => handling.key === `k${k}`).map((handling) => `${handling.topic}:${handling.seq}`),
      order,
      `k${k} in publication order, across both topics and both workers`,
    );
  });
}

/**
 * A deploy's first phase: the old worker starts first (it reads every partition when the new one arrives, as
 * in a real deploy), then the new one and a publisher; 10 keys × 4 rounds on both topics are handled, then
 * checked by assertDeploy, test.noted by the worker `noted`.
 */
async function deployPhase(h: Harness, log: Handling[], old: Bus<PgTransaction>, fresh: Bus<PgTransaction>, noted: 'old' | 'new') {
  const publisher = h.bus('publisher');
  await old.start();
  await fresh.start();
  await publisher.start();
  const keys = 10;
  const rounds = 4;
  const expected = await publishBoth(publisher, keys, rounds);
  await waitFor('every message', () => new Set(log.map((handling) => handling.id)).size >= keys * rounds * 2, 20_000);
  await sleep(300);
  assertDeploy(log, expected, noted, keys * rounds * 2);
  return { publisher, keys };
}

test('a rolling deploy that adds a handler: an old worker beside a new one never takes the new topic; every message handled once, in order, by a worker with its handler; nothing dead-lettered', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const log: Handling[] = [];
  const old = billingWorker(h, 'old', false, log);
  const fresh = billingWorker(h, 'new', true, log);
  const warned = warnings.length;
  await deployPhase(h, log, old, fresh, 'new');
  assert.equal(old.stats().subscriptions.billing?.deadLettered, 0);
  assert.equal(fresh.stats().subscriptions.billing?.deadLettered, 0);
  assert.equal(await fresh.backbone.deadLetters().count({ subscription: 'billing' }), 0, 'nothing dead-lettered');
  const said = warnings.slice(warned).find((warning) => warning.includes('Subscription billing: its workers handle different topics'));
  assert.ok(said, 'the disagreement is said');
  assert.match(
    said,
    /handles test\.ticked; .*handles test\.noted, test\.ticked|handles test\.noted, test\.ticked; .*handles test\.ticked/,
    'naming each worker and its topics',
  );
  t.diagnostic(said);
});

test('a rolling deploy that removes a handler: the new worker beside an old one that still has it never takes that topic; then, the old one gone, the new one reads everything', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const log: Handling[] = [];
  const old = billingWorker(h, 'old', true, log);
  const fresh = billingWorker(h, 'new', false, log);
  const { publisher, keys } = await deployPhase(h, log, old, fresh, 'old');

  // The deploy ends: the last old worker stops, and test.noted is no longer the subscription's (its binding
  // stays: its messages are skipped, after a worker timeout, as on PostgreSQL).
  await old.stop();
  const before = log.length;
  for (let k = 0; k < keys; k++) {
    await publisher.publish(Ticked, { key: `k${k}`, seq: 100 });
    await publisher.publish(Noted, { key: `k${k}`, seq: 100 });
    await publisher.publish(Ticked, { key: `k${k}`, seq: 101 });
  }
  await waitFor('the ticks after the deploy', () => log.length === before + keys * 2, 10_000);
  assert.ok(log.slice(before).every((handling) => handling.worker === 'new' && handling.topic === 'test.ticked'));
  for (let k = 0; k < keys; k++)
    assert.deepEqual(
      log
        .slice(before)
        .filter((h) => h.key === `k${k}`)
        .map((h) => h.seq),
      [100, 101],
    );
  assert.ok(
    warnings.some((w) => w.includes('topic test.noted is no longer the subscription') && w.includes('acknowledged unhandled')),
    'the skipping is said',
  );
  assert.equal(fresh.stats().subscriptions.billing?.deadLettered, 0);
  assert.equal(await fresh.backbone.deadLetters().count({ subscription: 'billing' }), 0, 'nothing dead-lettered');
});

test("a rolling deploy whose new workers all crash: the added topic stays the subscription's (the newest worker had it), the old worker holds and skips nothing; a new worker back handles it all once", async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  await createWorkerTables(h.schema);
  const log: Handling[] = [];
  const old = h.bus('old', { rabbit: quick });
  const record = (message: { id: string; topic: string; data: { key: string; seq: number } }, ctx: { attempt: number }) => {
    log.push({ worker: 'old', id: message.id, topic: message.topic, key: message.data.key, seq: message.data.seq, attempt: ctx.attempt });
  };
  old.subscription('shared', { partitions: 4, concurrency: 8 }).on(Ticked, record);
  await old.start();
  const publisher = h.bus('publisher');
  await publisher.start();
  const env = { SCHEMA: h.schema, PREFIX: h.prefix, TOCKED: '1', RABBITMQ_URL };
  const client = await connect();
  t.after(() => client.end());
  const effects = async (from: number) =>
    (await client.query<{ worker: number; message_id: string }>(`select worker, message_id from "${h.schema}".effects where seq >= $1`, [from])).rows;
  const publishRound = async (seq: number) => {
    for (let k = 0; k < 20; k++) {
      await publisher.publish(Ticked, { key: `k${k}`, seq });
      await publisher.publish(Tocked, { key: `k${k}`, seq });
    }
  };

  const fresh = await startProcess('rabbitmq-worker', env);
  await publishRound(1);
  await waitFor('the new worker handling the first round', async () => (await effects(1)).length + log.length >= 40, 15_000);
  fresh.kill();
  const warned = warnings.length;
  await publishRound(100);
  // The old worker hears the new one is gone: test.tocked is still the subscription's, so it reads nothing.
  await waitFor(
    'the old worker noticing',
    () => warnings.slice(warned).some((w) => w.includes('Subscription shared') && w.includes('gone now, handled test.ticked, test.tocked')),
    10_000,
  );
  await sleep(1_500);
  assert.deepEqual(
    log.filter((handling) => handling.seq >= 100),
    [],
    'the old worker handled nothing of the second round (not even test.ticked: a key spans both topics)',
  );

  const heir = await startProcess('rabbitmq-worker', env);
  await waitFor('the second round, by the new worker back', async () => (await effects(100)).length >= 40, 15_000);
  await sleep(300);
  const late = await effects(100);
  assert.equal(late.length, 40, 'each once');
  assert.equal(new Set(late.map((row) => row.message_id)).size, 40);
  assert.ok(late.every((row) => row.worker === heir.pid));
  assert.equal(await old.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
  await heir.stop();
});

test('a partition handed over while one of its keys waits for a delayed retry: the new reader keeps the key held, and the retry runs there', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const log: Array<{ worker: string; seq: number; attempt: number }> = [];
  const worker = (name: string) => {
    const bus = h.bus(name, { rabbit: quick });
    bus.subscribe(
      'handover',
      Ticked,
      (message, ctx) => {
        log.push({ worker: name, seq: message.data.seq, attempt: ctx.attempt });
        if (message.data.seq === 1 && ctx.attempt === 1) throw new Error('once, then after a delay');
      },
      { partitions: 2, retry: { immediate: 0, delayed: [1_500], jitter: 0 } },
    );
    return bus;
  };
  // A key of partition 1 of 2, which the second worker (the larger id) takes when it joins.
  let key = 'held';
  for (let i = 0; keyHash(key) % 2 !== 1; i++) key = `held-${i}`;
  const first = worker('first');
  await first.start();
  const publisher = h.bus('publisher');
  await publisher.start();
  await publisher.publish(Ticked, { key, seq: 1 });
  await waitFor('the first attempt', () => log.length === 1);
  for (let seq = 2; seq <= 6; seq++) await publisher.publish(Ticked, { key, seq });
  const second = worker('second');
  await second.start();
  await waitFor('every message', () => log.filter((entry) => entry.seq > 1).length === 5 && log.length === 7, 15_000);
  await sleep(300);
  assert.deepEqual(
    log.map((entry) => `${entry.worker}:${entry.seq}@${entry.attempt}`),
    ['first:1@1', 'second:1@2', ...[2, 3, 4, 5, 6].map((seq) => `second:${seq}@1`)],
    "the retry at the new reader, after its delay, and only then the key's later messages",
  );
});

test('partitions go in turn to the workers that handle every topic; none when no worker handles them all', () => {
  const worker = (id: string, ...topics: string[]) => ({ id, name: id, topics });
  const share = (workers: ReturnType<typeof worker>[], partitions: number) => Object.fromEntries(assignPartitions(workers, partitions));
  assert.deepEqual(share([worker('b', 'e'), worker('a', 'e')], 4), { a: [0, 2], b: [1, 3] });
  assert.deepEqual(share([worker('a', 'e'), worker('b', 'e'), worker('c', 'e')], 4), { a: [0, 3], b: [1], c: [2] });
  assert.deepEqual(share([worker('old', 'e'), worker('new', 'e', 'f')], 4), { old: [], new: [0, 1, 2, 3] }, 'the worker lacking a topic reads nothing');
  assert.deepEqual(share([worker('a', 'e', 'g'), worker('b', 'e', 'f')], 2), { a: [], b: [] }, 'no worker handles e, f and g: nobody reads');
  assert.deepEqual(share([worker('a', 'e')], 3), { a: [0, 1, 2] });
});

test('load sharing: two processes both handle a subscription, each key in order; one joins, one is killed with -9, nothing is lost or handled twice', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  // The schema the workers' outbox creates; the effects and attempts tables go beside it first.
  await createWorkerTables(h.schema);
  const publisher = h.bus('publisher', { outbox: true, relay: false });
  await publisher.start();
  const env = { SCHEMA: h.schema, PREFIX: h.prefix, HANDLE_MS: '3' };
  const first = await startProcess('rabbitmq-worker', { ...env, RABBITMQ_URL });
  const client = await connect();
  t.after(() => client.end());
  const effects = async () =>
    (
      await client.query<{ n: string; key: string; seq: number; worker: number; message_id: string }>(
        `select n, key, seq, worker, message_id from "${h.schema}".effects order by n`,
      )
    ).rows;
  const keys = 40;
  const rounds = 30;
  const publishRounds = async (from: number, to: number) => {
    for (let seq = from; seq <= to; seq++)
      await publisher.publishMany(
        Ticked,
        Array.from({ length: keys }, (_, k) => ({ key: `k${k}`, seq })),
      );
  };
  await publishRounds(1, 5);
  await waitFor('the first worker under way', async () => (await effects()).length >= 50, 20_000);
  // A second process joins: it takes its share of the partitions while the first still runs.
  const second = await startProcess('rabbitmq-worker', { ...env, RABBITMQ_URL });
  await publishRounds(6, 25);
  await waitFor('20 rounds handled', async () => (await effects()).length >= keys * 20, 30_000);
  // The first process dies mid-stream, handlers running, messages delivered and not acknowledged.
  first.kill();
  const beforeKill = await effects();
  await publishRounds(26, rounds);
  const total = keys * rounds;
  await waitFor(`all ${total} effects`, async () => (await effects()).length >= total, 30_000);
  await sleep(500);
  const rows = await effects();
  assert.equal(rows.length, total, 'every message handled once (an effect commits with its inbox record)');
  assert.equal(new Set(rows.map((row) => row.message_id)).size, total);
  const byKey = new Map<string, number[]>();
  for (const row of rows) byKey.set(row.key, [...(byKey.get(row.key) ?? []), row.seq]);
  for (const [key, seqs] of byKey)
    assert.deepEqual(
      seqs,
      Array.from({ length: rounds }, (_, i) => i + 1),
      `${key} in order`,
    );
  // Rounds 6 to 20 were published once both ran: each process took a part of them.
  const shared = beforeKill.filter((row) => row.seq >= 6 && row.seq <= 20);
  const shares = [first.pid, second.pid].map((pid) => shared.filter((row) => row.worker === pid).length);
  assert.ok(
    shares.every((share) => share >= shared.length / 5),
    `both processes handled a fair part of the messages while both ran (${shares.join(' / ')})`,
  );
  const late = rows.filter((row) => row.seq >= 26);
  assert.ok(
    late.every((row) => row.worker === second.pid),
    'the survivor took every partition over',
  );
  t.diagnostic(`rounds 6-20 by each process: ${shares.join(' / ')}; ${rows.length - beforeKill.length} handled after the kill, by the survivor`);
  await second.stop();
});
