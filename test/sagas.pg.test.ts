/**
 * Sagas on PostgreSQL under faults: instances driven by messages in random order from several publishers,
 * their workers killed with -9 midway; and the operator's view of an instance (listSagas, showSaga). What
 * every backbone promises is in test/conformance/sagas.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { listSagas, showSaga, type PostgresBackbone } from '../src/postgres/index.ts';
import { pgWorld } from './fixtures/bus.ts';
import { Counter, CounterAdded, CounterStarted, counterRetry } from './fixtures/counter-saga.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, sleep, waitFor } from './helpers.ts';

/** A deterministic shuffle (mulberry32), so a failure can be replayed. */
function shuffle<T>(items: T[], seed: number): T[] {
  let a = seed;
  const random = () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

test('1,000 sagas driven in random order by 4 publishers, their workers killed with -9 midway: each ends as a serial run would', async (t) => {
  const world = await pgWorld(t, 'saga');
  if (world === undefined) return;
  const { schema } = world;
  const workers = [await startProcess('saga-worker', { SCHEMA: schema }), await startProcess('saga-worker', { SCHEMA: schema })];
  try {
    const publishers = Array.from({ length: 4 }, (_, i) => world.bus(`publisher-${i}`));
    await Promise.all(publishers.map((bus) => bus.start()));
    const expected = new Map<string, { sum: number; adds: number }>();
    const messages: Array<{ kind: 'start'; id: string } | { kind: 'add'; id: string; n: number; slot: number }> = [];
    for (let i = 0; i < 1_000; i++) {
      const id = `c${i}`;
      messages.push({ kind: 'start', id });
      const adds = 1 + (i % 4);
      let sum = 0;
      for (let k = 0; k < adds; k++) {
        const n = (i * 7 + k * 13) % 100;
        sum += n;
        messages.push({ kind: 'add', id, n, slot: (i * 3 + k) % 64 });
      }
      expected.set(id, { sum, adds });
    }
    shuffle(messages, 42);
    let sent = 0;
    const killAt = Math.floor(messages.length / 3);
    await Promise.all(
      publishers.map(async (bus, p) => {
        for (let i = p; i < messages.length; i += publishers.length) {
          const message = messages[i]!;
          if (message.kind === 'start') await bus.publish(CounterStarted, { id: message.id });
          else await bus.publish(CounterAdded, { id: message.id, n: message.n, slot: message.slot });
          if (++sent === killAt) {
            // A third of the way: one worker dies mid-batch; a fresh one joins.
            workers[0]!.kill();
            workers.push(await startProcess('saga-worker', { SCHEMA: schema }));
          }
        }
      }),
    );
    const db = await connect();
    try {
      await waitFor(
        'every saga at its final state',
        async () => {
          const { rows: done } = await db.query<{ n: number }>(
            `select count(*)::int as n from "${schema}".sagas s join jsonb_to_recordset($1::jsonb) as e(id text, adds int) on e.id = s.id where s.saga = 'test.counter' and (s.state->>'adds')::int = e.adds`,
            [JSON.stringify([...expected].map(([id, { adds }]) => ({ id, adds })))],
          );
          return done[0]!.n === 1_000;
        },
        120_000,
      );
      const { rows } = await db.query<{ id: string; state: { sum: number; adds: number }; version: number }>(
        `select id, state, version from "${schema}".sagas where saga = 'test.counter'`,
      );
      assert.equal(rows.length, 1_000);
      const wrong = rows.filter(
        (row) => row.state.sum !== expected.get(row.id)!.sum || row.state.adds !== expected.get(row.id)!.adds || row.version !== row.state.adds + 1,
      );
      assert.deepEqual(wrong, [], 'each instance: the sum of its adds, once each, one version per transition');
      const { rows: dead } = await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".dead_letters`);
      assert.equal(dead[0]!.n, 0, 'no add gave up waiting for its start');
    } finally {
      await db.end();
    }
  } finally {
    for (const worker of workers) worker.kill();
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
