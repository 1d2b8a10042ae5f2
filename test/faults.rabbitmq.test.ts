/**
 * The RabbitMQ backbone under faults: connections closed by the server mid-stream, the broker stopped and
 * started again, a consumer process killed with -9 while a key waits for its delayed retry. Nothing is lost;
 * duplicates happen only where at-least-once allows, and the inbox removes them; a held key stays held.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TidingsError } from '../src/index.ts';
import { Names, rabbitmqDefaults } from '../src/rabbitmq/index.ts';
import { retryLevel } from '../src/rabbitmq/topology.ts';
import { Ticked } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, createEffects, RABBITMQ_URL, sleep, waitFor } from './helpers.ts';
import { closeConnections, createWorkerTables, rabbitWorld, messagesIn, rabbitmqctl, warnings } from './fixtures/rabbitmq.ts';

test('connections closed by the server while publishing and consuming: every message handled once, in per-key order', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  await createEffects(h.schema);
  const bus = h.bus('faults', { outbox: true });
  let handlerRuns = 0;
  bus.subscribe(
    'effects',
    Ticked,
    async (message, ctx) => {
      handlerRuns++;
      await ctx.tx.query(`insert into "${h.schema}".effects (message_id, key, seq, worker) values ($1, $2, $3, 1)`, [
        message.id,
        message.data.key,
        message.data.seq,
      ]);
      if (message.data.seq % 10 === 0) await sleep(2);
    },
    { concurrency: 8 },
  );
  await bus.start();
  const keys = 40;
  const perKey = 50;
  let kills = 0;
  let killing = true;
  const killer = (async () => {
    while (killing) {
      await sleep(400);
      if (killing) kills += (await closeConnections(h.connectionName)) > 0 ? 1 : 0;
    }
  })();
  let retriedByCaller = 0;
  const started = Date.now();
  await Promise.all(
    Array.from({ length: keys }, async (_, k) => {
      for (let seq = 1; seq <= perKey; seq++) {
        // The documented contract: a publish that failed retryably is published again with the same id.
        const id = `${h.prefix}${k}-${seq}`;
        for (;;) {
          try {
            await bus.publish(Ticked, { key: `key-${k}`, seq }, { id });
            break;
          } catch (error) {
            if (!(error instanceof TidingsError && error.retryable)) throw error;
            retriedByCaller++;
          }
        }
        if (seq % 10 === 0) await sleep(20);
      }
    }),
  );
  const client = await connect();
  t.after(() => client.end());
  const count = async () => Number((await client.query(`select count(*) as n from "${h.schema}".effects`)).rows[0].n);
  await waitFor('every effect', async () => (await count()) >= keys * perKey, 45_000);
  // However fast the stream went, the connections were closed under it at least twice.
  await waitFor('two closings', () => kills >= 2, 10_000);
  killing = false;
  await killer;
  await sleep(300);
  const { rows } = await client.query<{ key: string; seqs: number[]; ids: number }>(
    `select key, array_agg(seq order by n) as seqs, count(distinct message_id)::int as ids from "${h.schema}".effects group by key`,
  );
  assert.equal(rows.length, keys);
  for (const row of rows) {
    assert.equal(row.ids, perKey, `every message of ${row.key} once`);
    assert.deepEqual(
      row.seqs,
      Array.from({ length: perKey }, (_, i) => i + 1),
      `${row.key}: each effect once, in order`,
    );
  }
  assert.equal(await count(), keys * perKey, 'no effect twice (the inbox removed redeliveries)');
  assert.ok(kills >= 2, `connections were closed (${kills} times)`);
  const reconnects = warnings.filter((w) => w.includes('closed; reconnecting')).length;
  assert.ok(reconnects >= 2, `the backbone reconnected (${reconnects} times)`);
  t.diagnostic(
    warnings
      .filter((w) => !w.includes('closed; reconnecting'))
      .slice(0, 5)
      .join(' | '),
  );
  t.diagnostic(
    `${keys * perKey} messages in ${Date.now() - started} ms; connections closed ${kills} times, ${reconnects} reconnections; ${handlerRuns} handler runs (redeliveries of handled messages stop at the inbox); ${retriedByCaller} publishes retried by the caller`,
  );
});

test('the broker stopped and started: a publish fails with a retryable BACKBONE_UNAVAILABLE in bounded time, then everything resumes', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const bus = h.bus('outage', { rabbit: { publishTimeoutMs: 1_500 } });
  const seen = new Map<string, number>();
  bus.subscribe('outage', Ticked, (message) => {
    seen.set(message.id, (seen.get(message.id) ?? 0) + 1);
  });
  await bus.start();
  const before = await bus.publish(Ticked, { key: 'k', seq: 1 });
  await waitFor('the first message', () => seen.has(before.id));
  await rabbitmqctl('stop_app');
  try {
    const started = Date.now();
    const error = await bus.publish(Ticked, { key: 'k', seq: 2 }, { id: `${h.prefix}during` }).then(
      () => undefined,
      (caught: unknown) => caught,
    );
    assert.ok(error instanceof TidingsError, `a TidingsError, got ${String(error)}`);
    assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
    assert.equal(error.retryable, true);
    assert.equal(error.ref?.id, `${h.prefix}during`);
    assert.ok(Date.now() - started < 5_000, 'it did not hang');
  } finally {
    await rabbitmqctl('start_app');
  }
  // The caller retries with the same id; the consumer has reconnected and receives it.
  await waitFor(
    'the retried publish',
    async () => {
      try {
        await bus.publish(Ticked, { key: 'k', seq: 2 }, { id: `${h.prefix}during` });
        return true;
      } catch {
        return false;
      }
    },
    30_000,
  );
  await waitFor('the message published after the outage', () => seen.has(`${h.prefix}during`), 30_000);
  assert.equal(seen.get(before.id), 1);
});

for (const [label, prefetch, later] of [
  ['its later messages in the prefetch window', 16, 5],
  ['its later messages parked in the delay queue (prefetch 4)', 4, 14],
] as const) {
  test(`kill -9 while a key waits for its delayed retry, ${label}: the next worker holds the key (they never overtake the retry), and the retry comes with its history`, async (t) => {
    const h = await rabbitWorld(t, { postgres: true });
    if (h === undefined) return;
    await createWorkerTables(h.schema);
    const publisher = h.bus('publisher');
    await publisher.start();
    // held:1 fails every attempt: one delayed retry (3 s), then a dead letter.
    const env = {
      SCHEMA: h.schema,
      PREFIX: h.prefix,
      FAIL: 'held:1',
      RETRY: JSON.stringify({ immediate: 0, delayed: [3_000], jitter: 0 }),
      PREFETCH: String(prefetch),
    };
    const doomed = await startProcess('rabbitmq-worker', { ...env, RABBITMQ_URL });
    const client = await connect();
    t.after(() => client.end());
    const rows = async <R extends Record<string, unknown>>(sql: string) => (await client.query<R>(sql)).rows;
    const poison = await publisher.publish(Ticked, { key: 'held', seq: 1 });
    await waitFor('the first attempt', async () => (await rows(`select 1 from "${h.schema}".attempts where key = 'held'`)).length === 1, 15_000);
    // Waiting for its retry: its copy is in the delay queue (3 s rounded up the delay ladder).
    const delayQueue = new Names(h.prefix).retryQueue('shared', retryLevel(3_000, rabbitmqDefaults.retryMinMs));
    await waitFor('the retry in its delay queue', async () => (await messagesIn(delayQueue)) === 1, 15_000);
    // The key's later messages (and other keys' after them) reach the doomed worker and wait in its lane.
    for (let seq = 2; seq <= later + 1; seq++) await publisher.publish(Ticked, { key: 'held', seq });
    await publisher.publishMany(
      Ticked,
      Array.from({ length: 20 }, (_, k) => ({ key: `free-${k}`, seq: 1 })),
    );
    await waitFor('the other keys handled', async () => (await rows(`select 1 from "${h.schema}".effects where key like 'free-%'`)).length === 20, 15_000);
    doomed.kill();
    const killedAt = Date.now();

    const heir = await startProcess('rabbitmq-worker', { ...env, RABBITMQ_URL });
    const store = publisher.backbone.deadLetters();
    await waitFor('the retried message dead-lettered', async () => (await store.count({ subscription: 'shared' })) === 1, 20_000);
    await waitFor("the key's later messages", async () => (await rows(`select 1 from "${h.schema}".effects where key = 'held'`)).length === later, 15_000);
    await sleep(300);

    const attempts = await rows<{ attempt: number; worker: number; at: Date }>(
      `select attempt, worker, at from "${h.schema}".attempts where key = 'held' and seq = 1 order by n`,
    );
    assert.deepEqual(
      attempts.map((a) => [a.attempt, a.worker]),
      [
        [1, doomed.pid],
        [2, heir.pid],
      ],
      'attempt 1 by the killed worker; the retry, attempt 2, by the next one',
    );
    const held = await rows<{ seq: number; worker: number; at: Date }>(`select seq, worker, at from "${h.schema}".effects where key = 'held' order by n`);
    assert.deepEqual(
      held.map((e) => e.seq),
      Array.from({ length: later }, (_, i) => i + 2),
      'the later messages once each, in order',
    );
    const retriedAt = attempts[1]!.at.getTime();
    assert.ok(
      held.every((e) => e.at.getTime() > retriedAt),
      'none of them before the retry: the key stayed held across the crash',
    );
    const [dead] = await store.show(poison.id);
    assert.ok(dead);
    assert.deepEqual(
      dead.attempts.map((a) => [a.attempt, a.error.message]),
      [
        [1, `failing on purpose in worker ${doomed.pid}, attempt 1`],
        [2, `failing on purpose in worker ${heir.pid}, attempt 2`],
      ],
      'the dead letter carries both attempts, the first from the killed worker',
    );
    t.diagnostic(`retry ${retriedAt - killedAt} ms after the kill; the held key's messages followed ${held[0]!.at.getTime() - retriedAt} ms after it`);
    await heir.stop();
  });
}
