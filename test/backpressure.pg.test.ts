/**
 * Back-pressure on PostgreSQL: a slow subscription makes neither the publishers nor the process buffer
 * without bound.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import v8 from 'node:v8';
import vm from 'node:vm';
import pg from 'pg';
import type { PgPoolLike } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { DATABASE_URL, sleep } from './helpers.ts';

/** Bounds every test: a hang fails it instead of the whole run. */
const bounded = { timeout: 60_000 };
/** The retention tests run retention themselves and count what it deletes: the backbone's own must not. */
const faultDefaults = { retention: false } as const;

function collectGarbage(): () => void {
  v8.setFlagsFromString('--expose-gc');
  return vm.runInNewContext('gc') as () => void;
}

test('back-pressure: a slow subscription makes neither the publishers nor the process buffer without bound', bounded, async (t) => {
  const world = await pgWorld(t, 'slow', faultDefaults);
  if (world === undefined) return;
  const { schema } = world;
  const gc = collectGarbage();
  // The bus's own pool, wrapped to count what the consumer's reads return: the only way messages enter
  // the process on the consuming side.
  const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 10, application_name: `tidings:${schema}` });
  pool.on('error', () => undefined);
  t.after(() => pool.end());
  let fetched = 0;
  let largestRead = 0;
  let reads = 0;
  const counting = {
    // Whatever the statement (plain or prepared), a result whose rows are messages brought them into memory.
    query: async (query: string | pg.QueryConfig, params?: unknown[]) => {
      const result = await pool.query(query as string, params);
      const messages = result.rows.filter((row: { topic?: unknown; data?: unknown }) => row.topic === 'test.ticked' && row.data !== undefined).length;
      if (messages > 0) {
        reads++;
        fetched += messages;
        largestRead = Math.max(largestRead, messages);
      }
      return result;
    },
    connect: () => pool.connect(),
    end: () => pool.end(),
    options: (pool as unknown as { options: Record<string, unknown> }).options,
  } as unknown as PgPoolLike;

  const partitions = 2;
  const batchSize = 50;
  const bus = world.bus('slow', { pool: counting });
  let handled = 0;
  let maxBuffered = 0;
  bus.subscribe(
    'slow',
    Ticked,
    async () => {
      await sleep(20);
      handled++;
      maxBuffered = Math.max(maxBuffered, fetched - handled);
    },
    { partitions, batchSize, concurrency: 1 },
  );
  await bus.start();

  const payload = 'x'.repeat(2_000);
  // Warm up (connections, JIT, the first batches), then measure from a collected heap.
  await Promise.all(Array.from({ length: 200 }, (_, seq) => bus.publish(Ticked, { key: `w${seq % 20}`, seq, note: payload })));
  gc();
  const baseline = process.memoryUsage().heapUsed;

  const total = 8_000;
  const started = Date.now();
  let sent = 0;
  await Promise.all(
    Array.from({ length: 16 }, async (_, p) => {
      while (sent < total) {
        const seq = sent++;
        await bus.publish(Ticked, { key: `k${(seq * 16 + p) % 64}`, seq, note: payload });
      }
    }),
  );
  const publishMs = Date.now() - started;
  const handledWhenPublished = handled;
  const heap: number[] = [];
  gc();
  heap.push(process.memoryUsage().heapUsed - baseline);
  // While the consumer works through the backlog, the heap stays where it was.
  const sampleUntil = Date.now() + 2_000;
  while (Date.now() < sampleUntil) {
    await sleep(250);
    gc();
    heap.push(process.memoryUsage().heapUsed - baseline);
  }
  const backlogBytes = (total - handledWhenPublished) * payload.length;
  const mb = (bytes: number) => `${(bytes / 1_048_576).toFixed(1)} MB`;
  t.diagnostic(
    `published ${total} messages of 2 KB in ${publishMs} ms (${Math.round((total / publishMs) * 1000)}/s) while the slow subscription handled ${handledWhenPublished}; backlog ${mb(backlogBytes)} of payload in the database; heap growth after GC ${heap.map(mb).join(', ')}; largest read ${largestRead} messages in ${reads} reads; at most ${maxBuffered} messages read and not yet handled`,
  );
  await bus.stop();

  assert.ok(reads > 0, 'saw the consumer read messages through the pool');
  assert.ok(handledWhenPublished < total * 0.25, `publishers finished long before the slow consumer (it had handled ${handledWhenPublished} of ${total})`);
  assert.ok(largestRead <= partitions * batchSize, `a read returns at most batchSize per lane (${largestRead})`);
  assert.ok(maxBuffered <= partitions * batchSize, `messages in memory stay within one batch per lane (${maxBuffered})`);
  // The backlog is ~15 MB of payload (more as JS strings and objects); the heap must not hold it.
  assert.ok(Math.max(...heap) < 8 * 1_048_576, `heap growth stays under 8 MB while a ${mb(backlogBytes)} backlog waits (${heap.map(mb).join(', ')})`);
});

// ---- retention -----------------------------------------------------------------------------------
