/**
 * Scheduled delivery on PostgreSQL under load and races: many publishers, the scheduler's leader stopping
 * mid-stream, cancels racing the due time. What every backbone promises is in test/conformance/scheduled.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { sleep, waitFor } from './helpers.ts';

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]!;
}

test('8,000 messages due over 5 s from 4 publishers: each delivered once, none early; the leader stops midway and another takes over', async (t) => {
  const world = await pgWorld(t, 'sch');
  if (world === undefined) return;
  const consumer = world.bus('consumer');
  const due = new Map<string, number>();
  const late: number[] = [];
  const seen = new Map<string, number>();
  let early = 0;
  consumer.subscribe(
    'due',
    Ticked,
    (message) => {
      const at = due.get(message.id);
      if (at !== undefined) {
        if (Date.now() < at) early++;
        late.push(Date.now() - at);
      }
      seen.set(message.id, (seen.get(message.id) ?? 0) + 1);
    },
    { concurrency: 32 },
  );
  // The publishers start first, so one of them leads the scheduler; when they stop, the consumer's process must take over.
  const publishers = Array.from({ length: 4 }, (_, i) => world.bus(`publisher-${i}`));
  await Promise.all(publishers.map((bus) => bus.start()));
  await consumer.start();
  const start = Date.now() + 1_000;
  const total = 8_000;
  await Promise.all(
    publishers.map(async (bus, p) => {
      for (let chunk = 0; chunk < 20; chunk++) {
        const items = Array.from({ length: total / 4 / 20 }, (_, i) => ({ key: `k${(p * 97 + chunk * 13 + i) % 200}`, seq: chunk * 1_000 + i }));
        // Each chunk due at one instant, spread over 5 s.
        const at = start + Math.floor(((chunk * 4 + p) / 80) * 5_000);
        const published = await bus.publishMany(Ticked, items, { deliverAt: at });
        for (const message of published) due.set(message.id, at);
      }
    }),
  );
  // Midway, every publisher stops; the consumer's process (or another left) leads from then on.
  await sleep(Math.max(0, start + 2_500 - Date.now()));
  await Promise.all(publishers.map((bus) => bus.stop()));
  await waitFor(`${total} scheduled messages`, () => seen.size >= total, 60_000);
  await sleep(300);
  assert.equal(seen.size, total, 'each delivered');
  assert.equal([...seen.values()].filter((n) => n > 1).length, 0, 'none twice');
  assert.equal(early, 0, 'none early');
  t.diagnostic(
    `lateness after the due time: p50 ${percentile(late, 50)} ms, p99 ${percentile(late, 99)} ms, max ${Math.max(...late)} ms (the leader's hand-over included)`,
  );
});

test('a cancel racing the due time: each message is either cancelled or delivered, never both, never neither', async (t) => {
  const world = await pgWorld(t, 'sch');
  if (world === undefined) return;
  const consumer = world.bus('consumer');
  const delivered = new Set<string>();
  consumer.subscribe('race', Ticked, (message) => {
    delivered.add(message.id);
  });
  await consumer.start();
  const canceller = world.bus('canceller');
  await canceller.start();
  const dueAt = Date.now() + 1_500;
  const published = await consumer.publishMany(
    Ticked,
    Array.from({ length: 400 }, (_, i) => ({ key: `k${i}`, seq: i })),
    { deliverAt: dueAt },
  );
  // Cancel from another process, starting just before the due time and running past it.
  await sleep(Math.max(0, dueAt - Date.now() - 60));
  const cancelled = new Set<string>();
  await Promise.all(
    published.map(async ({ id }) => {
      if (await canceller.cancelScheduled(id)) cancelled.add(id);
    }),
  );
  await waitFor('every message settled', () => delivered.size + cancelled.size >= published.length, 20_000);
  await sleep(1_000);
  const both = published.filter(({ id }) => delivered.has(id) && cancelled.has(id));
  const neither = published.filter(({ id }) => !delivered.has(id) && !cancelled.has(id));
  assert.deepEqual(both, [], 'never both');
  assert.deepEqual(neither, [], 'never neither');
  t.diagnostic(`${cancelled.size} cancelled, ${delivered.size} delivered`);
});

test('kill -9: a schedule run by three processes, one killed, publishes every tick once; delayed messages survive their leader killed', async (t) => {
  const world = await pgWorld(t, 'sch');
  if (world === undefined) return;
  const { schema } = world;
  const consumer = world.bus('consumer');
  const ticks: number[] = [];
  const delayed = new Map<string, number>();
  consumer.subscribe('kill-ticks', Ticked, (message) => {
    if (message.data.key === 'tick') ticks.push(message.data.seq);
    else delayed.set(message.id, Date.now());
  });
  // The tickers start first: one of them leads the delayed-message scheduler.
  const tickers = [
    await startProcess('ticker', { SCHEMA: schema }),
    await startProcess('ticker', { SCHEMA: schema }),
    await startProcess('ticker', { SCHEMA: schema }),
  ];
  try {
    await consumer.start();
    const dueAt = Date.now() + 2_500;
    const published = await consumer.publishMany(
      Ticked,
      Array.from({ length: 200 }, (_, i) => ({ key: `d${i % 10}`, seq: i })),
      { deliverAt: dueAt },
    );
    await waitFor('two ticks', () => ticks.length >= 2, 20_000);
    // Kill every ticker but one, with -9, one after the other: the leader of the scheduler among them.
    tickers[0]!.kill();
    await sleep(1_200);
    tickers[1]!.kill();
    const killedAt = Date.now();
    await waitFor('ticks after the kills', () => ticks.some((seq) => seq * 1_000 > killedAt + 2_000), 20_000);
    await waitFor('every delayed message', () => delayed.size >= published.length, 20_000);
    const first = Math.min(...ticks);
    const last = Math.max(...ticks);
    assert.equal(new Set(ticks).size, ticks.length, `each tick once: ${ticks.join(' ')}`);
    assert.deepEqual(
      [...ticks].sort((a, b) => a - b),
      Array.from({ length: last - first + 1 }, (_, i) => first + i),
      'no tick missed across the kills',
    );
    assert.ok(
      [...delayed.values()].every((at) => at >= dueAt),
      'no delayed message early',
    );
    t.diagnostic(`ticks ${first}..${last}; delayed messages late by at most ${Math.max(...delayed.values()) - dueAt} ms`);
  } finally {
    for (const ticker of tickers) ticker.kill();
  }
});
