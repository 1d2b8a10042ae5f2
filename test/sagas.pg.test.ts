/**
 * Sagas on PostgreSQL under faults: instances driven by messages in random order from publishers in processes
 * of their own, their workers killed with -9 twice midway; and the operator's view of an instance (listSagas,
 * showSaga). What every backbone promises is in test/conformance/sagas.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { listSagas, showSaga, type PostgresBackbone } from '../src/postgres/index.ts';
import { pgWorld } from './fixtures/bus.ts';
import { Counter, CounterAdded, CounterStarted, counterRetry, counterWorkload } from './fixtures/counter-saga.ts';
import { startProcess, type TestProcess } from './fixtures/processes.ts';
import { connect, sleep, waitFor } from './helpers.ts';

test('1,000 sagas driven in random order by 4 publisher processes, workers killed with -9 twice midway: each ends as a serial run would, no update lost', async (t) => {
  const world = await pgWorld(t, 'saga');
  if (world === undefined) return;
  const { schema } = world;
  const [sagas, seed, publishers] = [1_000, 42, 4];
  const { messages, expected } = counterWorkload(sagas, seed);
  const workers = [await startProcess('saga-worker', { SCHEMA: schema }), await startProcess('saga-worker', { SCHEMA: schema })];
  const senders: TestProcess[] = [];
  const db = await connect();
  const began = Date.now();
  try {
    senders.push(
      ...(await Promise.all(
        Array.from({ length: publishers }, (_, index) =>
          startProcess('saga-publisher', { SCHEMA: schema, SAGAS: String(sagas), SEED: String(seed), INDEX: String(index), PUBLISHERS: String(publishers) }),
        ),
      )),
    );
    const transitions = async () =>
      (await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".saga_transitions where saga = 'test.counter'`)).rows[0]!.n;
    // A third and two thirds of the way through the transitions, a worker dies with -9 mid-batch and a fresh one joins.
    const kills: number[] = [];
    for (const share of [1 / 3, 2 / 3]) {
      await waitFor(`${Math.round(share * 100)} % of the transitions`, async () => (await transitions()) >= share * messages.length, 120_000);
      const victim = workers.find((worker) => worker.child.exitCode === null && worker.child.signalCode === null)!;
      victim.kill();
      kills.push(await transitions());
      workers.push(await startProcess('saga-worker', { SCHEMA: schema }));
    }
    await waitFor('every publisher done', () => senders.every((sender) => sender.lines.some((line) => line.startsWith('published '))), 120_000);
    const publishedIn = Date.now() - began;
    const sent = senders.map((sender) => Number(sender.lines.find((line) => line.startsWith('published '))!.split(' ')[1]));
    assert.equal(
      sent.reduce((sum, n) => sum + n, 0),
      messages.length,
      'every message published',
    );
    await waitFor(
      'every saga at its final state',
      async () => {
        const { rows: done } = await db.query<{ n: number }>(
          `select count(*)::int as n from "${schema}".sagas s join jsonb_to_recordset($1::jsonb) as e(id text, adds int) on e.id = s.id where s.saga = 'test.counter' and (s.state->>'adds')::int = e.adds`,
          [JSON.stringify([...expected].map(([id, { adds }]) => ({ id, adds })))],
        );
        return done[0]!.n === sagas;
      },
      120_000,
    );
    await sleep(500);
    const { rows } = await db.query<{ id: string; state: { sum: number; adds: number }; version: number }>(
      `select id, state, version from "${schema}".sagas where saga = 'test.counter'`,
    );
    assert.equal(rows.length, sagas);
    const wrong = rows.filter(
      (row) => row.state.sum !== expected.get(row.id)!.sum || row.state.adds !== expected.get(row.id)!.adds || row.version !== row.state.adds + 1,
    );
    assert.deepEqual(wrong, [], 'each instance: the sum of its adds, once each, one version per transition');
    const { rows: steps } = await db.query<{ n: number; distinct: number }>(
      `select count(*)::int as n, count(distinct (id, version))::int as distinct from "${schema}".saga_transitions where saga = 'test.counter'`,
    );
    assert.deepEqual(steps[0], { n: messages.length, distinct: messages.length }, 'one transition recorded per message, none twice');
    const { rows: dead } = await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".dead_letters`);
    assert.equal(dead[0]!.n, 0, 'no add gave up waiting for its start');
    t.diagnostic(
      `${messages.length} messages from ${publishers} processes (${sent.join(' + ')}) published within ${publishedIn} ms, every saga final after ${Date.now() - began} ms; workers killed at ${kills.join(' and ')} transitions`,
    );
  } finally {
    await db.end();
    for (const child of [...workers, ...senders]) child.kill();
  }
});

test('an operator sees an instance whole: state, version, each transition with its message, pending timeouts', async (t) => {
  const world = await pgWorld(t, 'saga');
  if (world === undefined) return;
  const { schema } = world;
  const { defineSaga } = await import('../src/index.ts');
  const { z } = await import('zod');
  const Watch = defineSaga({
    name: 'test.watch',
    state: z.object({ id: z.string(), seen: z.number().int() }),
    messages: { started: CounterStarted, added: CounterAdded },
    correlate: { started: (data) => data.id, added: (data) => data.id },
    start: {
      started: async (message, ctx) => {
        await ctx.requestTimeout('give-up', 3_600_000, { why: 'an hour without news' });
        return { id: message.data.id, seen: 0 };
      },
    },
    handle: { added: (state) => ({ ...state, seen: state.seen + 1 }) },
    timeouts: { 'give-up': (state) => state },
  });
  const bus = world.bus('watcher');
  const backbone = bus.backbone as PostgresBackbone;
  bus.saga(Watch, { retry: counterRetry });
  bus.saga(Counter, { retry: counterRetry });
  await bus.start();
  const started = await bus.publish(CounterStarted, { id: 'w1' });
  const added = await bus.publish(CounterAdded, { id: 'w1', n: 5, slot: 1 });
  await waitFor('two transitions', async () => (await backbone.sagas().find('test.watch', 'w1'))?.version === 2, 20_000);
  await sleep(200);
  const list = await listSagas(backbone.driver, { schema, saga: 'test.watch', status: 'active' });
  assert.equal(list.total, 1);
  assert.deepEqual(
    list.sagas.map((saga) => [saga.id, saga.version, saga.completed]),
    [['w1', 2, false]],
  );
  const detail = await showSaga(backbone.driver, { schema, saga: 'test.watch', id: 'w1' });
  assert.deepEqual(detail?.state, { id: 'w1', seen: 1 });
  assert.deepEqual(
    detail?.transitions.map((step) => [step.version, step.messageId, step.topic]),
    [
      [1, started.id, 'test.counter-started'],
      [2, added.id, 'test.counter-added'],
    ],
  );
  assert.equal(detail?.pendingTimeouts.length, 1);
  assert.equal(detail?.pendingTimeouts[0]?.name, 'give-up');
  assert.ok(new Date(detail?.pendingTimeouts[0]?.dueAt ?? 0).getTime() > Date.now() + 3_000_000);
  assert.equal(await showSaga(backbone.driver, { schema, saga: 'test.watch', id: 'nobody' }), undefined);
});
