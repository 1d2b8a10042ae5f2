/**
 * Scheduled delivery on PostgreSQL under load and races: publishers in processes of their own, the scheduler's
 * leader killed with -9 mid-stream, cancels racing the due time, a recurring schedule across processes killed. What every backbone promises is in test/conformance/scheduled.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, sleep, waitFor } from './helpers.ts';

/** The p-th percentile, rounded to the millisecond; "none" of no values (a phase the test's timing skipped). */
function percentile(values: number[], p: number): string {
  if (values.length === 0) return 'none';
  const sorted = [...values].sort((a, b) => a - b);
  return String(Math.round(sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]!));
}

test('20,000 messages due over 10 s, scheduled by 4 processes: each delivered once, none early; the leader killed with -9 midway, another takes over', async (t) => {
  const world = await pgWorld(t, 'sch');
  if (world === undefined) return;
  const [publishers, total, chunks, spanMs] = [4, 20_000, 50, 10_000];
  const consumer = world.bus('consumer');
  /** Delivery time minus due time, by due time. */
  const late: Array<{ due: number; ms: number }> = [];
  const seen = new Map<number, number>();
  let early = 0;
  consumer.subscribe(
    'due',
    Ticked,
    (message) => {
      const due = Number(message.data.note);
      const now = Date.now();
      if (now < due) early++;
      late.push({ due, ms: now - due });
      seen.set(message.data.seq, (seen.get(message.data.seq) ?? 0) + 1);
    },
    { concurrency: 32, batchSize: 500 },
  );
  // A process that only leads the scheduler starts first, so it holds the lease; the publishers and the test's
  // process are the candidates that take over when it dies.
  const env = (index: number, count: number) => ({
    SCHEMA: world.schema,
    INDEX: String(index),
    PUBLISHERS: String(publishers),
    COUNT: String(count),
    CHUNKS: String(chunks),
    SPAN_MS: String(spanMs),
    LEAD_MS: '1500',
  });
  const leader = await startProcess('scheduled-publisher', env(0, 0));
  const processes = await Promise.all(Array.from({ length: publishers }, (_, index) => startProcess('scheduled-publisher', env(index, total / publishers))));
  try {
    await consumer.start();
    const start = Date.now() + 2_000;
    const published = processes.map((child) => child.nextLine(/^published \d+ late \d+$/, spanMs + 30_000));
    for (const child of processes) child.child.stdin!.write(`publish ${start}\n`);
    // How far behind the scheduler's leader runs (the oldest due message not yet moved into the log), sampled:
    // the rest of the lateness is the consumer's.
    const db = await connect();
    const behind: number[] = [];
    const sampling = (async () => {
      while (seen.size < total) {
        const { rows } = await db.query<{ ms: number | null }>(
          `select (extract(epoch from now() - min(due_at)) * 1000)::float8 as ms from "${world.schema}".scheduled where due_at <= now()`,
        );
        behind.push(rows[0]?.ms ?? 0);
        await sleep(250);
      }
    })();
    // Midway, the leader dies with -9: its lease expires (leaseMs 2 s), and a survivor leads from then on.
    await sleep(Math.max(0, start + spanMs / 2 - Date.now()));
    const { rows } = await db.query<{ owner: string }>(`select owner from "${world.schema}".leases where name = 'scheduler'`);
    assert.ok(rows[0]?.owner.includes(`:${leader.pid}:`), `the first process leads the scheduler (the lease: ${rows[0]?.owner})`);
    leader.kill();
    const killedAt = Date.now();
    const reports = (await Promise.all(published)).map((line) => line.split(' ').map(Number));
    assert.deepEqual(
      reports.map(([, n]) => n),
      Array(publishers).fill(total / publishers),
      'every publisher scheduled its share',
    );
    const lateChunks = reports.reduce((sum, [, , , late]) => sum + late!, 0);
    await waitFor(`${total} scheduled messages`, () => seen.size >= total, 60_000);
    await sampling;
    await db.end();
    await sleep(300);
    assert.equal(seen.size, total, 'each delivered');
    assert.equal([...seen.values()].filter((n) => n > 1).length, 0, 'none twice');
    assert.equal(early, 0, 'none early');
    const before = late.filter((entry) => entry.due < killedAt).map((entry) => entry.ms);
    const after = late.filter((entry) => entry.due > killedAt + 3_000).map((entry) => entry.ms);
    const all = late.map((entry) => entry.ms);
    t.diagnostic(
      `${lateChunks} of ${chunks * publishers} chunks were published after their due time (a busy machine); lateness after the due time: ` +
        `while the first leader lived p50 ${percentile(before, 50)} ms, p99 ${percentile(before, 99)} ms (${before.length}); ` +
        `under the new leader p50 ${percentile(after, 50)} ms, p99 ${percentile(after, 99)} ms (${after.length}); ` +
        `overall p50 ${percentile(all, 50)} ms, p99 ${percentile(all, 99)} ms, max ${Math.max(...all)} ms (the hand-over included); ` +
        `the scheduler's leader ran behind by p50 ${percentile(behind, 50)} ms, max ${Math.round(Math.max(...behind))} ms (sampled every 250 ms)`,
    );
  } finally {
    for (const child of [leader, ...processes]) child.kill();
  }
});

test('cancels racing the due time from two buses: each message is either cancelled (by one of them) or delivered once, never both, never neither', async (t) => {
  const world = await pgWorld(t, 'sch');
  if (world === undefined) return;
  const consumer = world.bus('consumer');
  const delivered = new Map<string, number>();
  consumer.subscribe(
    'race',
    Ticked,
    (message) => {
      delivered.set(message.id, (delivered.get(message.id) ?? 0) + 1);
    },
    { concurrency: 16 },
  );
  await consumer.start();
  const cancellers = [world.bus('canceller-a'), world.bus('canceller-b')];
  await Promise.all(cancellers.map((bus) => bus.start()));
  // 2,000 messages due in groups of 10, 10 ms apart; each canceller cancels each message about when it is due
  // (within ±500 ms), so some cancels land before the due time, some after, and the two race each other.
  const [count, group, first] = [2_000, 10, Date.now() + 3_000];
  const dueOf = (i: number) => first + Math.floor(i / group) * 10;
  const published = (
    await Promise.all(
      Array.from({ length: count / group }, (_, g) =>
        consumer.publishMany(
          Ticked,
          Array.from({ length: group }, (_, j) => ({ key: `k${j}`, seq: g * group + j })),
          { deliverAt: dueOf(g * group) },
        ),
      ),
    )
  ).flat();
  const cancelledBy = new Map<string, string[]>();
  await Promise.all(
    cancellers.flatMap((bus, c) =>
      published.map(async ({ id }, i) => {
        await sleep(dueOf(i) - 500 + Math.random() * 1_000 - Date.now());
        if (await bus.cancelScheduled(id)) cancelledBy.set(id, [...(cancelledBy.get(id) ?? []), `c${c}`]);
      }),
    ),
  );
  await waitFor('every message settled', () => delivered.size + cancelledBy.size >= count, 30_000);
  await sleep(1_000);
  const ids = published.map(({ id }) => id);
  assert.deepEqual(
    ids.filter((id) => delivered.has(id) && cancelledBy.has(id)),
    [],
    'never both',
  );
  assert.deepEqual(
    ids.filter((id) => !delivered.has(id) && !cancelledBy.has(id)),
    [],
    'never neither',
  );
  assert.deepEqual(
    ids.filter((id) => (delivered.get(id) ?? 0) > 1 || (cancelledBy.get(id)?.length ?? 0) > 1),
    [],
    'delivered once, or cancelled by one canceller only',
  );
  assert.ok(delivered.size > 0 && cancelledBy.size > 0, `the race went both ways (${cancelledBy.size} cancelled, ${delivered.size} delivered)`);
  t.diagnostic(`${cancelledBy.size} cancelled, ${delivered.size} delivered`);
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
