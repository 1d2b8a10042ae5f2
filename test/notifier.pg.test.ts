/**
 * Wake-ups across processes, the notifier's recovery, and what happens when PostgreSQL cannot be reached.
 * Buses here poll only every 60 s, so a fast delivery proves a notification woke the consumer.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createBus, TidingsError } from '../src/index.ts';
import { postgres } from '../src/postgres/index.ts';
import type { SqlDriver } from '../src/postgres/connection/driver.ts';
import { pgDriver } from '../src/postgres/connection/pg.ts';
import { Notifier } from '../src/postgres/notifier.ts';
import { Ticked, ticksSeen } from './fixtures/contracts.ts';
import { connect, DATABASE_URL, requirePostgres, waitFor } from './helpers.ts';
import { pgWorld } from './fixtures/bus.ts';

test('a publish in one process wakes a consumer in another at once; after its LISTEN connection is killed, the notifier reconnects and catches up', async (t) => {
  const world = await pgWorld(t, 'n', { pollMs: 60_000 });
  if (world === undefined) return;
  const { schema } = world;
  const warnings: string[] = [];
  const consumer = world.bus('notified', { onWarning: (message) => warnings.push(message) });
  const seen = await ticksSeen(consumer, 'woken');
  // A second bus stands for another process: its own pool, its own notifier.
  const producer = world.bus('notified');
  await producer.start();

  let started = Date.now();
  await producer.publish(Ticked, { key: 'k', seq: 1 });
  await waitFor('delivery woken by NOTIFY', () => seen.length === 1, 5_000);
  t.diagnostic(`publish -> handler across processes: ${Date.now() - started} ms`);

  const admin = await connect();
  const { rows } = await admin.query(`select pg_terminate_backend(pid) as killed from pg_stat_activity where application_name = $1`, [
    `tidings-notifier:${schema}`,
  ]);
  assert.ok(rows.length >= 1, 'found the notifier connections');
  // Published while the consumer's notifier is down: it must be found by the catch-up after reconnecting.
  await producer.publish(Ticked, { key: 'k', seq: 2 });
  started = Date.now();
  await waitFor('catch-up after the notifier reconnected', () => seen.length === 2, 10_000);
  t.diagnostic(`notifier reconnect + catch-up: ${Date.now() - started} ms`);
  await waitFor('the notifier listening again', async () => {
    const { rows: back } = await admin.query(`select count(*)::int as n from pg_stat_activity where application_name = $1`, [`tidings-notifier:${schema}`]);
    return back[0].n >= 2;
  });
  started = Date.now();
  await producer.publish(Ticked, { key: 'k', seq: 3 });
  await waitFor('a wake-up through the new connection', () => seen.length === 3, 5_000);
  await admin.end();
  assert.deepEqual(seen, [1, 2, 3]);
  assert.ok(
    warnings.some((warning) => /Notifier lost its connection/.test(warning)),
    'the loss was reported',
  );
});

test('a publisher sends no NOTIFY while no other process consumes; one that starts consuming is woken by NOTIFY within about a second', async (t) => {
  const world = await pgWorld(t, 'n', { pollMs: 60_000 });
  if (world === undefined) return;
  const { schema } = world;
  const producer = world.bus('notified');
  const local: number[] = [];
  // A consumer in the publishing process is woken directly, not by NOTIFY.
  producer.subscribe('local', Ticked, (message) => {
    local.push(message.data.seq);
  });
  await producer.start();
  const listener = await connect();
  const heard: string[] = [];
  listener.on('notification', (message) => heard.push(message.payload ?? ''));
  await listener.query(`listen "${schema}"`);
  try {
    // The first publishes may notify (the answer "nobody else" is not known yet); from then on, none.
    for (let seq = 1; seq <= 3; seq++) await producer.publish(Ticked, { key: 'k', seq });
    await new Promise((resolve) => setTimeout(resolve, 1_200));
    const before = heard.length;
    for (let seq = 4; seq <= 40; seq++) {
      await producer.publish(Ticked, { key: 'k', seq });
      await producer.transaction(async (tx) => producer.publish(Ticked, { key: 't', seq }, { tx }));
    }
    await waitFor('the local consumer', () => local.length === 77, 5_000);
    await new Promise((resolve) => setTimeout(resolve, 200));
    t.diagnostic(`notifications while nobody else consumed: ${heard.length - before} (before the first answer: ${before})`);
    assert.equal(heard.length - before, 0, 'no NOTIFY while only the publishing process consumes');

    // Another process starts consuming (polling only every 60 s): within ~1 s, publishes NOTIFY again.
    const remote = world.bus('notified');
    const seen: number[] = [];
    remote.subscribe(
      'remote',
      Ticked,
      (message) => {
        seen.push(message.data.seq);
      },
      { startFrom: 'now' },
    );
    await remote.start();
    // Past its first reads at start: from now on only a NOTIFY (or its 60 s poll) can wake it.
    await new Promise((resolve) => setTimeout(resolve, 300));
    const started = Date.now();
    let seq = 1_000;
    while (!seen.some((s) => s >= 1_000) && Date.now() - started < 10_000) {
      await producer.publish(Ticked, { key: 'r', seq: seq++ });
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const waited = Date.now() - started;
    t.diagnostic(`a consumer started in another process was woken ${waited} ms after its first reads`);
    assert.ok(
      seen.some((s) => s >= 1_000),
      'the new consumer was woken',
    );
    assert.ok(waited < 5_000, `woken by NOTIFY, not by its 60 s poll (${waited} ms)`);
  } finally {
    await listener.end();
  }
});

test('when LISTEN does not deliver (a transaction-pooling proxy), the notifier says so once and consumers poll', async (t) => {
  if (!(await requirePostgres(t))) return;
  const real = await pgDriver({ url: DATABASE_URL, poolSize: 2, name: 'deaf' });
  // What a transaction pooler does to LISTEN: it succeeds, but notifications never come back.
  const deaf: SqlDriver = { ...real, listen: (_channels, handlers) => real.listen(['nobody_sends_here'], handlers) };
  const warnings: string[] = [];
  const notifier = new Notifier(deaf, {
    channel: 'deaf_test',
    pingMs: 10_000,
    reconnectMinMs: 100,
    reconnectMaxMs: 1_000,
    selfTestMs: 300,
    warn: (message) => warnings.push(message),
  });
  await notifier.start();
  assert.equal(notifier.listening, false);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /LISTEN\/NOTIFY does not deliver .* consumers fall back to polling/);
  await notifier.close();
  await real.close();
});

test('an unreachable database gives a typed, retryable error naming the URL without its password', async () => {
  const bus = createBus({
    service: 'nowhere',
    backbone: postgres({ url: 'postgres://user:secret@127.0.0.1:1/nothing', onWarning: () => undefined }),
  });
  const error = await bus.start().catch((e: unknown) => e);
  assert.ok(error instanceof TidingsError, String(error));
  assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
  assert.equal(error.retryable, true);
  assert.match(error.message, /postgres:\/\/user@127\.0\.0\.1:1\/nothing/);
  assert.doesNotMatch(error.message, /secret/);
  await bus.stop();
});
