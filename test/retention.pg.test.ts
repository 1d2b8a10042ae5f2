/**
 * Retention on PostgreSQL: storage stays bounded by default (src/postgres/retention.ts); racing live consumers
 * loses nothing; one process of many prunes per interval; the CLI runs the same.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type pg from 'pg';
import { z } from 'zod';
import { deadLetter, defineEvent, retryLater, TidingsError } from '../src/index.ts';
import { pgDriver } from '../src/postgres/connection/pg.ts';
import { prune, resolveRetention, Retention, retentionDefaults, type PruneResult } from '../src/postgres/retention.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { checkOrder, effects, logCount, recordEffect } from './fixtures/effects.ts';
import { connect, createEffects, DATABASE_URL, runTidings, sleep, waitFor } from './helpers.ts';

/** Bounds every test: a hang fails it instead of the whole run. */
const bounded = { timeout: 60_000 };
/** The retention tests run retention themselves and count what it deletes: the backbone's own must not. */
const faultDefaults = { retention: false } as const;

const DAY = 86_400_000;
const Audit = defineEvent('test.audit', { schema: z.object({ n: z.number() }), description: 'No subscription reads it' });
const Kept = defineEvent('test.kept', { schema: z.object({ n: z.number() }), description: 'Kept 30 days by a per-topic age' });

const countWhere = async (db: pg.Client, sql: string, params: unknown[] = []) => Number((await db.query(sql, params)).rows[0].n);

test(
  'retention: handled log rows older than their age go in small batches; rows a subscription has not handled, or a key is held on, stay unless forced; inbox records and dead letters beyond their windows go',
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'ret', faultDefaults);
    if (world === undefined) return;
    const { schema } = world;
    const db = await connect();
    try {
      // `live` runs throughout: it holds key h (a retry in a minute) and dead-letters poison messages.
      const live = world.bus('live');
      const liveSeen = new Set<string>();
      live.subscribe(
        'live',
        Ticked,
        (message) => {
          if (message.data.note === 'hold') return retryLater(60_000);
          if (message.data.note === 'poison') return deadLetter('poison');
          liveSeen.add(message.id);
          return undefined;
        },
        { partitions: 2 },
      );
      await live.start();
      // `paused` handles the first phase, then stops for a while.
      const pausedSeen = new Set<string>();
      const startPaused = async () => {
        const bus = world.bus('paused');
        bus.subscribe('paused', Ticked, (message) => void pausedSeen.add(message.id), { partitions: 2 });
        await bus.start();
        return bus;
      };
      const inbox = (subscription: string) => countWhere(db, `select count(*)::int as n from "${schema}".inbox where subscription = $1`, [subscription]);

      let paused = await startPaused();
      const phase1 = await live.publishMany(Ticked, [
        ...Array.from({ length: 100 }, (_, seq) => ({ key: `k${seq % 10}`, seq })),
        { key: 'h', seq: 1, note: 'hold' },
        { key: 'h', seq: 2 },
        { key: 'p', seq: 1, note: 'poison' },
      ]);
      await waitFor('phase 1 handled by both', async () => pausedSeen.size === 103 && (await inbox('live')) === 100);
      await waitFor(
        'key h held, p dead',
        async () =>
          (await countWhere(db, `select count(*)::int as n from "${schema}".held`)) === 2 &&
          (await countWhere(db, `select count(*)::int as n from "${schema}".dead_letters`)) === 1,
      );
      await paused.stop();
      const phase2 = await live.publishMany(
        Ticked,
        Array.from({ length: 50 }, (_, seq) => ({ key: `k${seq % 10}`, seq: 100 + seq })),
      );
      await live.publishMany(
        Audit,
        Array.from({ length: 30 }, (_, n) => ({ n })),
      );
      await live.publishMany(
        Kept,
        Array.from({ length: 20 }, (_, n) => ({ n })),
      );
      await waitFor('phase 2 handled by live', async () => (await inbox('live')) === 150);
      // Everything so far is 8 days old; then a few young messages.
      await db.query(`update "${schema}".log set time = time - interval '8 days'`);
      await live.publishMany(
        Ticked,
        Array.from({ length: 5 }, (_, seq) => ({ key: 'young', seq })),
      );
      await waitFor('young handled by live', async () => (await inbox('live')) === 155);

      const policy = { schema, batchSize: 10, log: { topics: { 'test.kept': 30 * DAY } }, inbox: { maxAgeMs: null }, deadLetters: { maxAgeMs: null } };
      const first = await prune(db, policy);
      t.diagnostic(`first run: ${JSON.stringify(first)}`);
      // Deleted: phase 1 but the two held rows (101 of 103), and the 30 audit rows no subscription reads.
      // Kept: the 2 held rows and the 50 of phase 2 that `paused` has not handled; not expired: test.kept, young.
      assert.deepEqual(first.log, { examined: 208, expired: 183, deleted: 131, kept: 52 });
      // 21 walking the log 10 rows per statement, and one sweeping answers to requests nobody waits for.
      assert.equal(first.statements, 22, 'the log walked 10 rows per statement');
      const byTopic = async () =>
        Object.fromEntries(
          (await db.query(`select topic, count(*)::int as n from "${schema}".log group by topic order by topic`)).rows.map(
            (row: { topic: string; n: number }) => [row.topic, row.n],
          ),
        );
      assert.deepEqual(await byTopic(), { 'test.kept': 20, 'test.ticked': 57 });
      assert.equal(
        await countWhere(db, `select count(*)::int as n from "${schema}".log l where exists (select 1 from "${schema}".held h where h.position = l.position)`),
        2,
        'held rows kept',
      );

      // A dry run with force counts what force would delete, and deletes nothing.
      const forced = await prune(db, { ...policy, log: { ...policy.log, force: true }, dryRun: true });
      assert.equal(forced.dryRun, true);
      assert.equal(forced.log.deleted, 52);
      assert.deepEqual(await byTopic(), { 'test.kept': 20, 'test.ticked': 57 });

      // `paused` comes back and gets every message retention kept for it.
      paused = await startPaused();
      await waitFor('paused catches up', () => phase2.every((m) => pausedSeen.has(m.id)) && pausedSeen.size === 158);
      await paused.stop();
      const second = await prune(db, policy);
      assert.deepEqual(second.log, { examined: 77, expired: 52, deleted: 50, kept: 2 });
      assert.deepEqual(await byTopic(), { 'test.kept': 20, 'test.ticked': 7 });

      // Inbox records beyond the de-duplication window (14 days by default), in batches.
      await db.query(`update "${schema}".inbox set handled_at = now() - interval '15 days' where message_id = any($1)`, [phase1.map((m) => m.id)]);
      const inboxRun = await prune(db, { schema, batchSize: 50, log: { maxAgeMs: null }, deadLetters: { maxAgeMs: null } });
      assert.equal(inboxRun.inbox.deleted, 203, 'live 100 + paused 103');
      assert.equal(inboxRun.statements, 6, 'inbox: 50 + 50 + 50 + 50 + 3; then the replies, in one');
      assert.equal(await inbox('live'), 55);
      assert.equal(await inbox('paused'), 55);

      // Dead letters beyond their window (30 days by default).
      const [poison] = phase1.slice(-1);
      await live.publish(Ticked, { key: 'p', seq: 2, note: 'poison' });
      await waitFor('a second dead letter', async () => (await countWhere(db, `select count(*)::int as n from "${schema}".dead_letters`)) === 2);
      await db.query(`update "${schema}".dead_letters set dead_at = now() - interval '31 days' where message_id = $1`, [poison!.id]);
      const deadRun = await prune(db, { schema, log: { maxAgeMs: null }, inbox: { maxAgeMs: null } });
      assert.equal(deadRun.deadLetters.deleted, 1);
      assert.equal(await countWhere(db, `select count(*)::int as n from "${schema}".dead_letters where message_id = $1`, [poison!.id]), 0);
      assert.equal(await countWhere(db, `select count(*)::int as n from "${schema}".dead_letters`), 1);
      assert.ok(liveSeen.size >= 155);
    } finally {
      await db.end();
    }
  },
);

test('retention: defaults, and every bad option named in one error', () => {
  assert.deepEqual(resolveRetention('test'), {
    log: { maxAgeMs: 7 * DAY, topics: {}, force: false },
    inbox: { maxAgeMs: 14 * DAY },
    deadLetters: { maxAgeMs: 30 * DAY },
    intervalMs: 60_000,
    batchSize: 1_000,
    vacuum: false,
  });
  assert.equal(retentionDefaults.batchSize, 1_000);
  assert.throws(
    () =>
      new Retention({ query: async () => ({ rows: [] }) }, { schema: 'tidings', batchSize: 0, intervalMs: 5, log: { maxAgeMs: -1, topics: { 'a.b': 1.5 } } }),
    (error: unknown) =>
      error instanceof TidingsError &&
      error.code === 'INVALID_OPTIONS' &&
      ['log.maxAgeMs', 'log.topics["a.b"]', 'intervalMs', 'batchSize'].every((name) => error.message.includes(name)),
  );
  assert.throws(() => new Retention({ query: async () => ({ rows: [] }) }, { schema: 'x"; drop' }), /schema "x\\"; drop" is invalid/);
});

test('retention racing live consumers (every row pruned the moment it is handled) loses nothing', bounded, async (t) => {
  const world = await pgWorld(t, 'race', faultDefaults);
  if (world === undefined) return;
  const { schema } = world;
  await createEffects(schema);
  const db = await connect();
  try {
    const bus = world.bus();
    const fast = new Set<string>();
    bus.subscribe('fast', Ticked, (message) => void fast.add(message.id), { partitions: 2 });
    bus.subscribe('slow', Ticked, (message, ctx) => recordEffect(ctx.tx, schema, message), { partitions: 3, batchSize: 20, concurrency: 2 });
    await bus.start();
    let pruning = true;
    let runs = 0;
    let deleted = 0;
    const pruner = (async () => {
      while (pruning) {
        const result = await prune(db, { schema, batchSize: 25, log: { maxAgeMs: 0 }, inbox: { maxAgeMs: null }, deadLetters: { maxAgeMs: null } });
        runs++;
        deleted += result.log.deleted;
      }
    })();
    const ids = new Set<string>();
    await Promise.all(
      Array.from({ length: 8 }, async (_, p) => {
        for (let seq = 0; seq < 250; seq++) ids.add((await bus.publish(Ticked, { key: `k${p}`, seq })).id);
      }),
    );
    await waitFor(
      'both subscriptions done',
      async () => fast.size === ids.size && (await countWhere(db, `select count(*)::int as n from "${schema}".effects`)) === ids.size,
      30_000,
    );
    pruning = false;
    await pruner;
    await bus.stop();
    const rows = await effects(db, schema);
    assert.deepEqual(new Set(rows.map((row) => row.message_id)), ids, 'the slow subscription handled every message');
    assert.equal(rows.length, ids.size, 'once each');
    assert.deepEqual(checkOrder(rows), []);
    assert.deepEqual(fast, ids, 'the fast one too');
    const last = await prune(db, { schema, log: { maxAgeMs: 0 } });
    assert.equal(await logCount(db, schema), 0, 'in the end the whole log is gone');
    t.diagnostic(`${ids.size} messages; ${runs} retention runs during the stream deleted ${deleted} rows, the last ${last.log.deleted}`);
  } finally {
    await db.end();
  }
});

test('Retention on a timer: of two processes one prunes per interval; stop() ends it', bounded, async (t) => {
  const world = await pgWorld(t, 'timer', faultDefaults);
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus();
  await bus.start();
  const driver = await pgDriver({ url: DATABASE_URL, poolSize: 2, name: schema });
  t.after(() => driver.close());
  const db = await connect();
  try {
    const runs: Array<{ who: string; at: number; result: PruneResult }> = [];
    const warnings: unknown[] = [];
    const make = (who: string) =>
      new Retention(driver, {
        schema,
        intervalMs: 200,
        log: { maxAgeMs: 0 },
        onRun: (result) => runs.push({ who, at: Date.now(), result }),
        onWarning: (_message, error) => warnings.push(error),
      });
    const [a, b] = [make('a'), make('b')];
    a.start();
    b.start();
    await bus.publishMany(
      Audit,
      Array.from({ length: 100 }, (_, n) => ({ n })),
    );
    await waitFor('the log pruned', async () => (await logCount(db, schema)) === 0, 15_000);
    await waitFor('six runs', () => runs.length >= 6, 15_000);
    await Promise.all([a.stop(), b.stop()]);
    const stoppedAt = runs.length;
    const ats = runs.map((run) => run.at).sort((x, y) => x - y);
    const gaps = ats.slice(1).map((at, i) => at - ats[i]!);
    t.diagnostic(`runs by ${runs.map((run) => run.who).join('')}; gaps ${gaps.join(', ')} ms`);
    // A turn lasts 90 % of the interval (180 ms): two runs closer than that would be two processes pruning at once.
    assert.ok(
      gaps.every((gap) => gap >= 120),
      `one run per turn (gaps ${gaps.join(', ')} ms)`,
    );
    assert.deepEqual(warnings, []);
    await sleep(600); // three intervals: a run after stop() would show here
    assert.equal(runs.length, stoppedAt, 'no run after stop()');
  } finally {
    await db.end();
  }
});

test('tidings prune: the CLI runs the same retention, with --dry-run', bounded, async (t) => {
  const world = await pgWorld(t, 'cli', faultDefaults);
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus();
  await bus.start();
  await bus.publishMany(
    Audit,
    Array.from({ length: 12 }, (_, n) => ({ n })),
  );
  const db = await connect();
  try {
    await db.query(`update "${schema}".log set time = time - interval '2 days'`);
    const run = (args: string[]) => runTidings(['--schema', schema, ...args], { ...process.env, DATABASE_URL });
    const dry = await run(['--json', 'prune', '--log-days', '1', '--dry-run']);
    assert.equal(dry.code, 0, dry.stderr);
    assert.equal(JSON.parse(dry.stdout).log.deleted, 12);
    assert.equal(await logCount(db, schema), 12, 'a dry run deletes nothing');
    const kept = await run(['prune']);
    assert.equal(kept.code, 0, kept.stderr);
    assert.match(kept.stdout, /Deleted 0 log rows/, 'two days old is within the default 7 days');
    const real = await run(['prune', '--log-days', '1']);
    assert.equal(real.code, 0, real.stderr);
    assert.match(real.stdout, /Deleted 12 log rows, 0 inbox records and 0 dead letters/);
    assert.equal(await logCount(db, schema), 0);
  } finally {
    await db.end();
  }
});
