/**
 * Fair delivery across a backlog (src/postgres/consume/lanes.ts, fair reads): a noisy tenant's backlog,
 * thousands of messages committed before the quiet tenants' ones, does not hold the quiet ones up when the
 * subscription is fair, and does without it; per-key order, exactly once, and a kill -9 of the consumer
 * mid-backlog loses nothing. Verdicts are counts (what was handled before what), never milliseconds.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { SubscribeOptions } from '../src/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { readStatus } from '../src/postgres/index.ts';
import { prune } from '../src/postgres/retention.ts';
import { checkOrder, effects, recordEffect } from './fixtures/effects.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, createEffects, sleep, waitFor } from './helpers.ts';

const bounded = { timeout: 120_000 };
const NOISY_KEYS = 20;
const QUIET = Array.from({ length: 10 }, (_, i) => `q${i}`);
const QUIET_SEQS = 5;

const noisyTicks = (from: number, to: number) =>
  Array.from({ length: (to - from) * NOISY_KEYS }, (_, i) => ({ key: `n${i % NOISY_KEYS}`, seq: from + Math.floor(i / NOISY_KEYS) }));

/**
 * A noisy backlog of `backlog` messages (20 keys), then, once the consumer is under way, 5 messages for each
 * of 10 quiet tenants (2 keys each), then after all that another round of both (a tenant split off rejoins
 * its partition's cursor). Returns how many noisy messages were handled before the last quiet one of the
 * first round, and checks order and exactly-once.
 */
async function run(t: Parameters<typeof pgWorld>[0], backlog: number, options: SubscribeOptions): Promise<number | undefined> {
  const world = await pgWorld(t, 'fairlog');
  if (world === undefined) return undefined;
  const bus = world.bus();
  const seqs = new Map<string, number[]>();
  const handled = new Map<string, number>();
  let noisy = 0;
  let quiet = 0;
  let noisyBeforeQuiet = -1;
  const quietTotal = QUIET.length * QUIET_SEQS;
  bus.subscribe(
    'fair',
    Ticked,
    async (message) => {
      handled.set(message.id, (handled.get(message.id) ?? 0) + 1);
      seqs.set(message.key, [...(seqs.get(message.key) ?? []), message.data.seq]);
      if (message.tenant === 'noisy') {
        await sleep(1);
        noisy++;
      } else if (++quiet === quietTotal) noisyBeforeQuiet = noisy;
    },
    { partitions: 2, batchSize: 100, concurrency: 4, startFrom: 'beginning', ...options },
  );
  const perRound = backlog / NOISY_KEYS;
  for (let seq = 0; seq < perRound; seq += 10) await bus.publishMany(Ticked, noisyTicks(seq, seq + 10), { tenant: 'noisy' });
  await bus.start();
  // The consumer has opened its first window (the whole backlog): the quiet messages are in later ones.
  await waitFor('the first noisy message', () => noisy > 0);
  // Each quiet tenant's messages on two keys, their seqs ascending per key.
  const quietTicks = (tenant: string, first: number) => Array.from({ length: QUIET_SEQS }, (_, i) => ({ key: `${tenant}-${i % 2}`, seq: first + i }));
  for (const tenant of QUIET) {
    await bus.publishMany(Ticked, quietTicks(tenant, 0), { tenant });
  }
  await waitFor('the backlog and the quiet messages', () => noisy === backlog && quiet === quietTotal, 60_000);
  // Second round: both again, after the backlog drained.
  await bus.publishMany(Ticked, noisyTicks(perRound, perRound + 5), { tenant: 'noisy' });
  for (const tenant of QUIET) {
    await bus.publishMany(Ticked, quietTicks(tenant, QUIET_SEQS), { tenant });
  }
  const total = backlog + 5 * NOISY_KEYS + 2 * quietTotal;
  await waitFor('the second round', () => handled.size === total, 30_000);
  await sleep(200); // a message handled twice would show now
  await bus.stop();
  assert.equal(handled.size, total, 'every message handled');
  assert.deepEqual(
    [...handled].filter(([, n]) => n !== 1),
    [],
    'each message handled once',
  );
  for (const [key, list] of seqs) {
    assert.deepEqual(
      list,
      [...list].sort((a, b) => a - b),
      `${key} in order`,
    );
  }
  return noisyBeforeQuiet;
}

test(
  "fair reads: quiet tenants' messages committed after a noisy tenant's backlog of 2,000 are handled long before it drains; without fairness, after all of it",
  bounded,
  async (t) => {
    const fair = await run(t, 2_000, { tenantConcurrency: 1 });
    if (fair === undefined) return;
    const unfair = await run(t, 2_000, {});
    t.diagnostic(`noisy messages handled before the last quiet one: fair ${fair}, unfair ${unfair} (backlog 2000)`);
    // Unfair: the backlog is one window, read in commit order before the window the quiet messages are in.
    assert.equal(unfair, 2_000, 'without fairness the whole backlog goes first');
    // Fair: the noisy tenant is split off after a twentieth of the first read; the quiet window is read beside it.
    assert.ok(fair !== -1 && fair < 1_000, `fair: ${fair} noisy messages were handled before the last quiet one`);
  },
);

test(
  'fair reads: a tenant alone on a fair subscription is read in whole batches once it has been alone a second, not a share at a time',
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'fairalone');
    if (world === undefined) return;
    const { schema } = world;
    const db = await connect();
    try {
      const bus = world.bus();
      const backlog = 30_000;
      for (let seq = 0; seq < backlog / NOISY_KEYS; seq += 50) await bus.publishMany(Ticked, noisyTicks(seq, seq + 50), { tenant: 'noisy' });
      // Every acknowledgement moves the partition's cursor: one update of `cursors` per batch (one partition).
      await db.query(`create table "${schema}".acks (n int);
      create function "${schema}".count_ack() returns trigger language plpgsql as $$ begin insert into "${schema}".acks values (1); return null; end $$;
      create trigger count_ack after update on "${schema}".cursors for each statement execute function "${schema}".count_ack();`);
      let handled = 0;
      bus.subscribe('fair', Ticked, () => void handled++, { partitions: 1, batchSize: 100, concurrency: 4, startFrom: 'beginning', tenantConcurrency: 1 });
      await bus.start();
      await waitFor('the backlog', () => handled === backlog, 60_000);
      await bus.stop();
      const batches = Number((await db.query(`select count(*)::int as n from "${schema}".acks`)).rows[0].n);
      t.diagnostic(`${backlog} messages of one tenant in ${batches} batches of at most 100`);
      // Its share of a read (5 of 100) while others may be active, its first second; whole batches after it.
      // At its share throughout it would take 6,000.
      assert.ok(batches < 2_000, `${batches} batches for a backlog of ${backlog}, batchSize 100`);
    } finally {
      await db.end();
    }
  },
);

test('fair reads: kill -9 of the consumer mid-backlog while a tenant is split off, twice: every message once, in order per key', bounded, async (t) => {
  const world = await pgWorld(t, 'fairkill', { retention: false });
  if (world === undefined) return;
  const { schema } = world;
  await createEffects(schema);
  const db = await connect();
  const publisher = world.bus('publisher');
  await publisher.start();
  const published = new Set<string>();
  const publish = async (ticks: Array<{ key: string; seq: number }>, tenant: string) => {
    for (const receipt of await publisher.publishMany(Ticked, ticks, { tenant })) published.add(receipt.id);
  };
  // The worker's keys: n0..n19 for the noisy tenant, 100 messages each.
  for (let seq = 0; seq < 100; seq += 10) await publish(noisyTicks(seq, seq + 10), 'noisy');
  const env = { SCHEMA: schema, HANDLE_MS: '1', PROGRESS: '1', TENANT_CONCURRENCY: '1' };
  let worker = await startProcess('worker', env);
  let quietSeq = 0;
  const publishQuiet = async () => {
    for (const tenant of QUIET) await publish([{ key: `${tenant}-0`, seq: quietSeq }], tenant);
    quietSeq++;
  };
  try {
    for (let kill = 0; kill < 2; kill++) {
      await publishQuiet();
      await waitFor(
        'a tenant split off, its cursor acknowledged',
        async () => (await db.query(`select 1 from "${schema}".cursors where subscription = 'ordered' and tenants ? 'noisy'`)).rows.length > 0,
        20_000,
      );
      await publishQuiet();
      await worker.nextLine(/^handling n/);
      worker.child.kill('SIGKILL');
      assert.equal(await worker.exited, 'SIGKILL');
      // With no worker running, the subscription's lag is exactly what is not handled yet, the split-off
      // tenant's backlog (counted from its own cursor) included.
      const status = await readStatus(db, { schema, subscription: 'ordered' });
      const done = Number((await db.query(`select count(*)::int as n from "${schema}".effects`)).rows[0].n);
      assert.equal(status.subscriptions[0]!.lag, published.size - done, 'lag counts every message not handled');
      // And it names the tenant read apart, while one is (it joins back once caught up).
      const apart =
        (await db.query(`select bool_or(tenants ? 'noisy') as apart from "${schema}".cursors where subscription = 'ordered'`)).rows[0].apart === true;
      assert.deepEqual(status.subscriptions[0]!.readApart, apart ? ['noisy'] : []);
      worker = await startProcess('worker', env);
    }
    await publishQuiet();
    const handledAll = async () => Number((await db.query(`select count(distinct message_id)::int as n from "${schema}".effects`)).rows[0].n) >= published.size;
    await waitFor('an effect for every published message', handledAll, 60_000).catch(async (error: unknown) => {
      const { rows: missing } = await db.query(
        `select l.tenant, l.key, l.data ->> 'seq' as seq, l.position from "${schema}".log l
         where l.id = any($1::text[]) and not exists (select 1 from "${schema}".effects e where e.message_id = l.id) order by l.position limit 20`,
        [[...published]],
      );
      const { rows: cursors } = await db.query(`select partition, done::text, window_snapshot::text, window_position, tenants from "${schema}".cursors`);
      t.diagnostic(`missing: ${JSON.stringify(missing)}; cursors: ${JSON.stringify(cursors)}`);
      throw error;
    });
    await worker.stop();
    const rows = await effects(db, schema);
    assert.equal(rows.length, published.size, 'exactly one effect per message (effects through ctx.tx commit with the ack)');
    assert.deepEqual(new Set(rows.map((row) => row.message_id)), published, 'every published message handled');
    assert.deepEqual(checkOrder(rows), [], 'per-key order kept across the kills');
    t.diagnostic(`${published.size} messages, 2 kills -9 with the noisy tenant split off`);
  } finally {
    worker.child.kill('SIGKILL');
    await worker.exited;
    await db.end();
  }
});

test("fair reads: retention pruning every row the moment it is handled never deletes a split-off tenant's unread backlog", bounded, async (t) => {
  const world = await pgWorld(t, 'fairprune', { retention: false });
  if (world === undefined) return;
  const { schema } = world;
  await createEffects(schema);
  const db = await connect();
  try {
    const bus = world.bus();
    const ids = new Set<string>();
    for (let seq = 0; seq < 50; seq += 10)
      for (const receipt of await bus.publishMany(Ticked, noisyTicks(seq, seq + 10), { tenant: 'noisy' })) ids.add(receipt.id);
    // batchSize 20: the noisy tenant is split off after 5 rows of the first read; the partitions' own cursors
    // then close the backlog's window long before the noisy tenant's cursor has read it.
    bus.subscribe('fair', Ticked, (message, ctx) => recordEffect(ctx.tx, schema, message), {
      partitions: 2,
      batchSize: 20,
      concurrency: 2,
      startFrom: 'beginning',
      tenantConcurrency: 1,
    });
    await bus.start();
    let pruning = true;
    let deleted = 0;
    const pruner = (async () => {
      while (pruning) {
        const result = await prune(db, { schema, batchSize: 50, log: { maxAgeMs: 0 }, inbox: { maxAgeMs: null }, deadLetters: { maxAgeMs: null } });
        deleted += result.log.deleted;
      }
    })();
    for (let seq = 0; seq < 20; seq++) {
      for (const tenant of QUIET.slice(0, 4)) ids.add((await bus.publish(Ticked, { key: `${tenant}-0`, seq }, { tenant })).id);
    }
    const count = async () => Number((await db.query(`select count(*)::int as n from "${schema}".effects`)).rows[0].n);
    await waitFor('every message handled', async () => (await count()) >= ids.size, 60_000);
    pruning = false;
    await pruner;
    await bus.stop();
    const rows = await effects(db, schema);
    assert.deepEqual(new Set(rows.map((row) => row.message_id)), ids, 'every message handled');
    assert.equal(rows.length, ids.size, 'once each');
    assert.deepEqual(checkOrder(rows), [], 'per-key order');
    assert.ok(deleted > 0, 'retention deleted rows as they were handled');
    t.diagnostic(`${ids.size} messages; retention deleted ${deleted} rows while they were read`);
  } finally {
    await db.end();
  }
});
