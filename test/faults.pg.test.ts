/**
 * Faults, against a real PostgreSQL server: workers killed with -9 mid-batch, connections cut mid-stream,
 * hostile input, back-pressure from a slow subscription, and retention (bounded storage). Each test has its
 * own schema and stays well under a minute; figures (takeover and reconnect times) are printed as
 * diagnostics.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { after, test, type TestContext } from 'node:test';
import v8 from 'node:v8';
import vm from 'node:vm';
import pg from 'pg';
import { z } from 'zod';
import { createBus, deadLetter, defineEvent, keyHash, newId, retryLater, TidingsError, type Bus } from '../src/index.ts';
import { postgres, readStatus, type PgPoolLike, type PgTransaction, type PostgresOptions } from '../src/postgres/index.ts';
import { pgDriver } from '../src/postgres/driver.ts';
import { prune, resolveRetention, Retention, retentionDefaults, type PruneResult } from '../src/postgres/retention.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, createEffects, DATABASE_URL, dropSchema, requirePostgres, sleep, uniqueSchema, waitFor } from './helpers.ts';

const schemas: string[] = [];
const buses: Bus<PgTransaction>[] = [];
const children = new Set<ChildProcess>();
const cleanups: Array<() => Promise<unknown>> = [];
after(async () => {
  for (const child of children) child.kill('SIGKILL');
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
  for (const schema of schemas) await dropSchema(schema);
});

/** Bounds every test: a hang fails it instead of the whole run. */
const bounded = { timeout: 60_000 };

function newBus(schema: string, service = 'faults', options: Partial<PostgresOptions> = {}): Bus<PgTransaction> {
  const source = options.pool === undefined ? { url: DATABASE_URL } : {};
  const bus = createBus({
    service,
    backbone: postgres({
      ...source,
      schema,
      leaseMs: 2_000,
      heartbeatMs: 500,
      pollMs: 1_000,
      onWarning: () => undefined,
      // The retention tests run retention themselves and count what it deletes: the backbone's own must not.
      retention: false,
      ...options,
    }),
  });
  buses.push(bus);
  return bus;
}

async function setup(t: TestContext, prefix = 'f'): Promise<string | undefined> {
  if (!(await requirePostgres(t))) return undefined;
  const schema = uniqueSchema(prefix);
  schemas.push(schema);
  return schema;
}

interface Effect {
  message_id: string;
  key: string;
  seq: number;
  worker: number;
}

async function effects(db: pg.Client, schema: string): Promise<Effect[]> {
  return (await db.query(`select message_id, key, seq, worker from "${schema}".effects order by n`)).rows;
}

/** Each key's sequence numbers in the order their effects committed, with exact repeats collapsed. */
function checkOrder(rows: readonly Effect[]): string[] {
  const problems: string[] = [];
  const last = new Map<string, number>();
  for (const row of rows) {
    const previous = last.get(row.key) ?? -1;
    if (row.seq !== previous + 1 && row.seq !== previous) problems.push(`${row.key}: ${row.seq} after ${previous}`);
    last.set(row.key, Math.max(previous, row.seq));
  }
  return problems;
}

/** `count` keys per partition of `partitions`, so each partition has traffic. */
function keysPerPartition(partitions: number, count: number): string[] {
  const buckets = Array.from({ length: partitions }, () => [] as string[]);
  for (let i = 0; buckets.some((bucket) => bucket.length < count); i++) {
    const key = `k${i}`;
    const bucket = buckets[keyHash(key) % partitions]!;
    if (bucket.length < count) bucket.push(key);
  }
  return buckets.flat();
}

// ---- worker processes ----------------------------------------------------------------------------

interface Worker {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly exited: Promise<NodeJS.Signals | null>;
  /** Resolves with the next stdout line matching `pattern` (lines before this call are ignored). */
  nextLine(pattern: RegExp, timeoutMs?: number): Promise<string>;
}

/** A consumer process (test/fixtures/worker.ts). It dies with its stdin, so it never outlives the test. */
function startWorker(schema: string, env: Record<string, string> = {}): Promise<Worker> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/worker.ts'], {
    env: { ...process.env, DATABASE_URL, SCHEMA: schema, ...env },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  children.add(child);
  const exited = new Promise<NodeJS.Signals | null>((resolve) =>
    child.once('exit', (_code, signal) => {
      children.delete(child);
      resolve(signal);
    }),
  );
  const waiting = new Set<{ pattern: RegExp; resolve: (line: string) => void }>();
  const lines = createInterface({ input: child.stdout! });
  let ready: (() => void) | undefined;
  lines.on('line', (line) => {
    if (line === 'ready') ready?.();
    for (const waiter of waiting) {
      if (waiter.pattern.test(line)) {
        waiting.delete(waiter);
        waiter.resolve(line);
      }
    }
  });
  const worker: Worker = {
    child,
    pid: child.pid!,
    exited,
    nextLine(pattern, timeoutMs = 10_000) {
      return new Promise((resolve, reject) => {
        const waiter = {
          pattern,
          resolve: (line: string) => {
            clearTimeout(timer);
            resolve(line);
          },
        };
        const timer = setTimeout(() => {
          waiting.delete(waiter);
          reject(new Error(`worker ${child.pid} printed no line matching ${pattern} within ${timeoutMs} ms`));
        }, timeoutMs);
        waiting.add(waiter);
      });
    },
  };
  return new Promise((resolve, reject) => {
    const early = () => reject(new Error(`worker ${child.pid} exited before it was ready`));
    void exited.then(early);
    ready = () => {
      ready = undefined;
      resolve(worker);
    };
  });
}

async function stopWorker(worker: Worker): Promise<void> {
  if (worker.child.exitCode !== null || worker.child.signalCode !== null) return;
  worker.child.kill('SIGTERM');
  const timer = setTimeout(() => worker.child.kill('SIGKILL'), 10_000);
  await worker.exited;
  clearTimeout(timer);
}

// ---- kill -9 -------------------------------------------------------------------------------------

test('kill -9 of a worker mid-batch, 4 times, while publishers publish: one effect per message, in order per key; the survivor takes over the dead one\'s partitions', bounded, async (t) => {
  const schema = await setup(t, 'kill');
  if (schema === undefined) return;
  await createEffects(schema);
  const db = await connect();
  const publisher = newBus(schema, 'publisher');
  await publisher.start();
  // 4 partitions (the worker's subscription), 4 keys in each; each key is published by one loop, in order.
  const keys = keysPerPartition(4, 4);
  const partitionOfKey = new Map(keys.map((key) => [key, keyHash(key) % 4]));
  const published = new Set<string>();
  let publishing = true;
  const loops = Array.from({ length: 4 }, async (_, p) => {
    const mine = keys.filter((_key, i) => i % 4 === p);
    for (let seq = 0; publishing; seq++) {
      for (const key of mine) published.add((await publisher.publish(Ticked, { key, seq })).id);
      await sleep(100); // about 150 messages a second in all: a steady stream, not a flood
    }
  });

  const workerEnv = { HANDLE_MS: '5', PROGRESS: '1' };
  const held = async (pid: number): Promise<number[]> =>
    (
      await db.query(`select partition from "${schema}".cursors where subscription = 'ordered' and owner like $1 and lease_expires_at > now() order by partition`, [
        `%:${pid}:%`,
      ])
    ).rows.map((row: { partition: number }) => row.partition);
  let workers = [await startWorker(schema, workerEnv), await startWorker(schema, workerEnv)];
  const takeovers: number[] = [];
  let midBatch = 0;
  try {
    for (let round = 0; round < 4; round++) {
      await waitFor('two workers with two partitions each', async () => (await Promise.all(workers.map((w) => held(w.pid)))).every((p) => p.length === 2), 20_000);
      // Alternately the older and the newer worker.
      const [victim, survivor] = round % 2 === 0 ? [workers[0]!, workers[1]!] : [workers[1]!, workers[0]!];
      const victimPartitions = await held(victim.pid);
      const victimKeys = keys.filter((key) => victimPartitions.includes(partitionOfKey.get(key)!));
      const { rows: mark } = await db.query(`select coalesce(max(n), 0)::int8 as n from "${schema}".effects`);
      // Mid-batch: the victim has just written a message's effect in its batch's transaction and is
      // still handling (HANDLE_MS), so the batch is not acknowledged yet.
      const line = await victim.nextLine(/^handling /);
      victim.child.kill('SIGKILL');
      const killedAt = Date.now();
      assert.equal(await victim.exited, 'SIGKILL');
      await waitFor(
        "the survivor's first effect on the dead worker's partitions",
        async () =>
          (await db.query(`select 1 from "${schema}".effects where n > $1 and worker <> $2 and key = any($3) limit 1`, [mark[0].n, victim.pid, victimKeys])).rows
            .length > 0,
        20_000,
      );
      const takeover = Date.now() - killedAt;
      takeovers.push(takeover);
      const [key, seq] = line.slice('handling '.length).split(':');
      const { rows: effect } = await db.query(`select worker from "${schema}".effects where key = $1 and seq = $2`, [key, Number(seq)]);
      // The message it was handling when it died: its write was rolled back with the unacknowledged batch.
      if (!effect.some((row: { worker: number }) => row.worker === victim.pid)) midBatch++;
      t.diagnostic(
        `kill ${round + 1}: worker ${victim.pid} killed while handling ${key}:${seq} (partitions ${victimPartitions.join(', ')}); worker ${survivor.pid} took over in ${takeover} ms`,
      );
      workers = [survivor, await startWorker(schema, workerEnv)];
    }
    publishing = false;
    await Promise.all(loops);
    await waitFor(
      'an effect for every published message',
      async () => Number((await db.query(`select count(distinct message_id)::int as n from "${schema}".effects`)).rows[0].n) >= published.size,
      30_000,
    );
    // After a graceful stop nothing more can be written: the count is final.
    await Promise.all(workers.map(stopWorker));
    const rows = await effects(db, schema);
    assert.equal(rows.length, published.size, 'exactly one effect per message (effects through ctx.tx commit with the ack)');
    assert.deepEqual(new Set(rows.map((row) => row.message_id)), published, 'every published message handled');
    assert.deepEqual(checkOrder(rows), [], 'per-key order kept across the kills');
    assert.ok(midBatch >= 1, `at least one kill landed mid-batch (${midBatch} of 4 did)`);
    const leaseMs = 2_000;
    for (const ms of takeovers) assert.ok(ms < leaseMs + 5_000, `takeover within the lease (2 s) and a few heartbeats: ${ms} ms`);
    t.diagnostic(
      `${published.size} messages; 4 kills (${midBatch} verified mid-batch); takeover after kill -9 (leaseMs 2000, heartbeatMs 500): ${takeovers.join(', ')} ms, max ${Math.max(...takeovers)} ms`,
    );
  } finally {
    publishing = false;
    for (const worker of workers) worker.child.kill('SIGKILL');
    await Promise.all(workers.map((worker) => worker.exited));
    await db.end();
  }
});

// ---- connections cut -----------------------------------------------------------------------------

test('PostgreSQL connections cut mid-stream, 3 times: publishers get a retryable BACKBONE_UNAVAILABLE, consumers and the notifier reconnect by themselves, nothing is lost or skipped', bounded, async (t) => {
  const schema = await setup(t, 'cut');
  if (schema === undefined) return;
  await createEffects(schema);
  const db = await connect();
  // The default backstop poll (5 s): a quick delivery after the cuts proves a notification woke the consumer.
  const warnings: string[] = [];
  const onWarning = (message: string) => void warnings.push(message);
  const producer = newBus(schema, 'producer', { pollMs: 5_000, onWarning });
  const consumer = newBus(schema, 'consumer', { pollMs: 5_000, onWarning });
  consumer.subscribe(
    'resilient',
    Ticked,
    async (message, ctx) => {
      await ctx.tx.query(`insert into "${schema}".effects (message_id, key, seq, worker) values ($1, $2, $3, 0)`, [message.id, message.data.key, message.data.seq]);
    },
    { partitions: 2, batchSize: 50 },
  );
  await consumer.start();
  await producer.start();

  const attempts = new Map<string, number>();
  const unexpected: unknown[] = [];
  let unavailable = 0;
  let cutAt = Number.POSITIVE_INFINITY;
  let firstAfterCut: { id: string; at: number } | undefined;
  /** Publishes until it succeeds, retrying with the same id what the backbone says may be retried. */
  async function publish(key: string, seq: number, inTransaction: boolean): Promise<void> {
    const id = newId();
    for (let attempt = 1; ; attempt++) {
      const startedAt = Date.now();
      try {
        if (inTransaction) {
          await producer.transaction(async (tx) => {
            await producer.publish(Ticked, { key, seq }, { tx, id });
            await sleep(2); // a little time between the insert and the commit, for a cut to land in
          });
        } else {
          await producer.publish(Ticked, { key, seq }, { id });
        }
        attempts.set(id, attempt);
        if (startedAt >= cutAt && firstAfterCut === undefined) firstAfterCut = { id, at: Date.now() };
        return;
      } catch (error) {
        if (error instanceof TidingsError && error.code === 'BACKBONE_UNAVAILABLE' && error.retryable) {
          unavailable++;
          await sleep(20);
          continue;
        }
        unexpected.push(error);
        return;
      }
    }
  }
  const keys = keysPerPartition(2, 4);
  let publishing = true;
  // Half the loops publish on their own (group commit), half inside transactions Tidings drives.
  const loops = Array.from({ length: 4 }, async (_, p) => {
    const mine = keys.filter((_key, i) => i % 4 === p);
    for (let seq = 0; publishing; seq++) {
      for (const key of mine) await publish(key, seq, p % 2 === 1);
      await sleep(10);
    }
  });
  const count = async () => Number((await db.query(`select count(*)::int as n from "${schema}".effects`)).rows[0].n);
  const notifiers = async () =>
    Number((await db.query(`select count(*)::int as n from pg_stat_activity where application_name = $1`, [`tidings-notifier:${schema}`])).rows[0].n);

  try {
    const figures: string[] = [];
    for (let round = 1; round <= 3; round++) {
      const before = await count();
      await waitFor('messages flowing', async () => (await count()) >= before + 100, 20_000);
      firstAfterCut = undefined;
      cutAt = Date.now();
      const { rows: cut } = await db.query(`select pg_terminate_backend(pid) as cut from pg_stat_activity where application_name = any($1)`, [
        [`tidings:${schema}`, `tidings-notifier:${schema}`],
      ]);
      assert.ok(cut.length >= 3, `cut the pools' and both notifiers' connections (${cut.length})`);
      await waitFor('both notifiers listening again', async () => (await notifiers()) >= 2, 20_000);
      const notifierMs = Date.now() - cutAt;
      await waitFor('a publish begun after the cut to succeed', () => firstAfterCut !== undefined, 20_000);
      const published = firstAfterCut!;
      await waitFor(
        'the consumer to handle a message published after the cut',
        async () => (await db.query(`select 1 from "${schema}".effects where message_id = $1`, [published.id])).rows.length > 0,
        20_000,
      );
      const resumedMs = Date.now() - cutAt;
      figures.push(`${resumedMs}`);
      t.diagnostic(
        `cut ${round}: ${cut.length} connections terminated; first publish after it succeeded in ${published.at - cutAt} ms; notifiers listening again after ${notifierMs} ms; a message published after the cut was handled ${resumedMs} ms after the cut`,
      );
    }
    publishing = false;
    await Promise.all(loops);
    assert.deepEqual(unexpected, [], 'every failed publish was a retryable BACKBONE_UNAVAILABLE');
    await waitFor(
      'an effect for every message whose publish resolved',
      async () => Number((await db.query(`select count(distinct message_id)::int as n from "${schema}".effects`)).rows[0].n) >= attempts.size,
      30_000,
    );
    // Woken by a notification through a reconnected LISTEN, not found by the 5 s backstop poll.
    const started = Date.now();
    const last = await producer.publish(Ticked, { key: 'after-the-cuts', seq: 0 });
    await waitFor('a wake-up after the cuts', async () => (await db.query(`select 1 from "${schema}".effects where message_id = $1`, [last.id])).rows.length > 0, 10_000);
    const wakeMs = Date.now() - started;
    assert.ok(wakeMs < 2_500, `delivered by notification in ${wakeMs} ms, not by the 5 s poll`);
    await consumer.stop();

    const rows = await effects(db, schema);
    const perId = new Map<string, number>();
    for (const row of rows) perId.set(row.message_id, (perId.get(row.message_id) ?? 0) + 1);
    const missing = [...attempts.keys()].filter((id) => !perId.has(id));
    assert.deepEqual(missing, [], 'every publish that resolved was delivered');
    const twiceOnce = [...attempts].filter(([id, n]) => n === 1 && perId.get(id) !== 1);
    assert.deepEqual(twiceOnce, [], 'a message published once has exactly one effect');
    const retried = [...attempts].filter(([, n]) => n > 1);
    const duplicated = retried.filter(([id]) => (perId.get(id) ?? 0) > 1).length;
    assert.deepEqual(checkOrder(rows.filter((row) => row.key !== 'after-the-cuts')), [], 'per-key order kept');
    t.diagnostic(
      `${attempts.size} messages; ${unavailable} publish attempts failed with BACKBONE_UNAVAILABLE (retryable) and were retried with the same id (${retried.length} messages; ${duplicated} of them handled twice because the cut attempt had in fact committed); wake-up after the cuts ${wakeMs} ms; ${warnings.length} warnings (the consumers' failed batches and heartbeats, the notifiers' reconnects)`,
    );
  } finally {
    publishing = false;
    await Promise.all(loops);
    await db.end();
  }
});

/**
 * Runs in a child process, because the failure it looks for ends the process: a bus on Tidings' own pool
 * (`url`) has a transaction open and idle (the application works between two statements, or a handler
 * runs between its write through ctx.tx and the batch's ack) when its connection is cut.
 */
const idleTransactionCut = (mode: 'transaction' | 'handler') => `
  const pg = (await import('pg')).default;
  const { createBus } = await import(${JSON.stringify(new URL('../src/index.ts', import.meta.url).pathname)});
  const { postgres } = await import(${JSON.stringify(new URL('../src/postgres/index.ts', import.meta.url).pathname)});
  const { Ticked } = await import(${JSON.stringify(new URL('./fixtures/contracts.ts', import.meta.url).pathname)});
  const schema = process.env.SCHEMA;
  const admin = new pg.Client({ connectionString: process.env.DATABASE_URL });
  await admin.connect();
  const cut = () => admin.query('select pg_terminate_backend(pid) from pg_stat_activity where application_name = $1', ['tidings:' + schema]);
  const bus = createBus({ service: 'cut', backbone: postgres({ url: process.env.DATABASE_URL, schema, leaseMs: 2000, heartbeatMs: 500, onWarning: () => {} }) });
  let handled = 0;
  let inHandler;
  const entered = new Promise((resolve) => (inHandler = resolve));
  bus.subscribe('idle', Ticked, async (message, ctx) => {
    if (${JSON.stringify(mode)} === 'handler') {
      await ctx.tx.query('select 1');
      if (handled === 0) { inHandler(); await new Promise((r) => setTimeout(r, 500)); }
    }
    handled++;
  }, { partitions: 1 });
  await bus.start();
  const result = {};
  if (${JSON.stringify(mode)} === 'transaction') {
    let opened;
    const open = new Promise((resolve) => (opened = resolve));
    const work = bus.transaction(async (tx) => {
      await tx.query('select 1');
      opened();
      await new Promise((r) => setTimeout(r, 500));
      await tx.query('select 2');
    }).then(() => 'committed', (error) => error.code + (error.retryable ? ' retryable' : ''));
    await open;
    await cut();
    result.transaction = await work;
  } else {
    await bus.publish(Ticked, { key: 'k', seq: 1 });
    await entered;
    await cut();
    const deadline = Date.now() + 15000;
    while (handled < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    result.handled = handled;
  }
  await bus.stop();
  await admin.end();
  process.stdout.write('RESULT ' + JSON.stringify(result) + '\\n');
`;

async function runIsolated(schema: string, code: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', '--input-type=module', '-e', code], {
    env: { ...process.env, DATABASE_URL, SCHEMA: schema },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  children.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  const exitCode = await new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  clearTimeout(timer);
  children.delete(child);
  return { code: exitCode, stdout, stderr };
}

test(
  "a connection cut while a transaction is open and idle fails that transaction with BACKBONE_UNAVAILABLE, and the process goes on (Tidings' own pool)",
  // Before the fix, pg emitted 'error' on the idle checked-out client with no listener: an uncaught
  // exception that ended the process. Hence a child process: a regression fails this test, not the run.
  bounded,
  async (t) => {
    const outcomes: Record<string, unknown> = {};
    for (const mode of ['transaction', 'handler'] as const) {
      const schema = await setup(t, 'idle');
      if (schema === undefined) return;
      const run = await runIsolated(schema, idleTransactionCut(mode));
      const result = /^RESULT (.*)$/m.exec(run.stdout)?.[1];
      const uncaught = /terminating connection due to administrator command|Connection terminated[^\n]*/.exec(run.stderr)?.[0];
      outcomes[mode] = result === undefined ? `process ended with exit code ${run.code}${uncaught === undefined ? '' : ` (uncaught: ${uncaught})`}` : JSON.parse(result);
    }
    t.diagnostic(JSON.stringify(outcomes));
    assert.deepEqual(outcomes, {
      // bus.transaction rejects with the retryable error; the application may run it again.
      transaction: { transaction: 'BACKBONE_UNAVAILABLE retryable' },
      // The batch is rolled back and handled again on a new connection: the handler runs twice.
      handler: { handled: 2 },
    });
  },
);

test(
  'a publish retried with the same id after its first attempt did commit (the cut came after COMMIT) is handled once, even when both copies land in one batch',
  bounded,
  async (t) => {
    const schema = await setup(t, 'twice');
    if (schema === undefined) return;
    const bus = newBus(schema);
    const handled: string[] = [];
    bus.subscribe('once', Ticked, (message) => void handled.push(`${message.id}:${message.data.seq}`), { partitions: 1 });
    await bus.start();
    // What a retry after an ambiguous BACKBONE_UNAVAILABLE produces: the same message id, twice in the log.
    await bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'a', seq: 1 }, { tx, id: 'retried-in-one-batch' });
      await bus.publish(Ticked, { key: 'a', seq: 1 }, { tx, id: 'retried-in-one-batch' });
    });
    await bus.publish(Ticked, { key: 'a', seq: 2 });
    await waitFor('the message after the copies', () => handled.some((h) => h.endsWith(':2')));
    // Across batches the inbox already de-duplicates.
    await bus.publish(Ticked, { key: 'b', seq: 1 }, { id: 'retried-in-two-batches' });
    await waitFor('the first copy', () => handled.includes('retried-in-two-batches:1'));
    await bus.publish(Ticked, { key: 'b', seq: 1 }, { id: 'retried-in-two-batches' });
    await bus.publish(Ticked, { key: 'b', seq: 2 });
    await waitFor('the message after the second copy', () => handled.filter((h) => h.endsWith(':2')).length === 2);
    t.diagnostic(JSON.stringify(handled));
    assert.deepEqual(handled.filter((h) => h.startsWith('retried-in-two-batches')), ['retried-in-two-batches:1']);
    assert.deepEqual(handled.filter((h) => h.startsWith('retried-in-one-batch')), ['retried-in-one-batch:1']);
  },
);

test(
  'copies of one id in nearby batches of a backlog are handled once, although each batch is read while the one before is handled and acknowledged',
  bounded,
  async (t) => {
    const schema = await setup(t, 'ahead');
    if (schema === undefined) return;
    const bus = newBus(schema);
    // A backlog of 4 batches of 10, with copies in consecutive batches (10 and 11), two batches apart (5 and
    // 25: the third batch is read while the first's acknowledgement may still be in flight) and three (8, 38).
    const copies = new Map([
      [10, 'copy-across-batches'],
      [11, 'copy-across-batches'],
      [5, 'copy-two-apart'],
      [25, 'copy-two-apart'],
      [8, 'copy-three-apart'],
      [38, 'copy-three-apart'],
    ]);
    await bus.transaction(async (tx) => {
      for (let seq = 1; seq <= 40; seq++) {
        await bus.publish(Ticked, { key: `k${seq % 3}`, seq }, { tx, id: copies.get(seq) ?? `m${seq}` });
      }
    });
    const handled: string[] = [];
    bus.subscribe(
      'once',
      Ticked,
      async (message) => {
        handled.push(message.id);
        // Slow enough that the read of the next batch (sent when this batch's rows came) returns meanwhile.
        await new Promise((resolve) => setTimeout(resolve, 2));
      },
      { partitions: 1, batchSize: 10, startFrom: 'beginning' },
    );
    await bus.start();
    await waitFor('the whole backlog', () => handled.includes('m40'));
    await bus.stop();
    t.diagnostic(`handled ${handled.length} messages`);
    for (const id of new Set(copies.values())) assert.equal(handled.filter((handledId) => handledId === id).length, 1, id);
    assert.equal(handled.length, 37);
  },
);

// ---- hostile input -------------------------------------------------------------------------------

const Nested = defineEvent('test.nested', {
  schema: z.object({ key: z.string(), tree: z.unknown() }),
  key: (data) => data.key,
  description: 'Any JSON under tree',
});
type Tree = string | { a: Tree };
const tree: z.ZodType<Tree> = z.lazy(() => z.union([z.string(), z.object({ a: tree })]));
const Recursive = defineEvent('test.recursive', {
  schema: z.object({ key: z.string(), tree }),
  key: (data) => data.key,
  description: 'A recursive schema',
});
const Loose = defineEvent('test.loose', {
  schema: z.looseObject({ key: z.string() }),
  key: (data) => data.key,
  description: 'Keeps unknown keys',
});

function deepObject(levels: number): Tree {
  let value: Tree = 'leaf';
  for (let i = 0; i < levels; i++) value = { a: value };
  return value;
}
const deepJson = (levels: number) => `${'{"a":'.repeat(levels)}"leaf"${'}'.repeat(levels)}`;

/** A row written behind Tidings' back, as a broken producer or a hand-made fix would. */
async function insertRow(db: pg.Client, schema: string, row: { id: string; topic?: string; key?: string; data: string }): Promise<void> {
  const key = row.key ?? 'x';
  const topic = row.topic ?? 'test.ticked';
  await db.query(
    `insert into "${schema}".log (topic, id, type, source, time, key, key_hash, correlation_id, data)
     values ($1, $2, $3, 'psql', now(), $4, $5, $2, $6::jsonb)`,
    [topic, row.id, `${topic}.v1`, key, keyHash(key), row.data],
  );
}

const logCount = async (db: pg.Client, schema: string) => Number((await db.query(`select count(*)::int as n from "${schema}".log`)).rows[0].n);

test('hostile input at publish: an oversized payload, a NUL among concurrent publishes, hostile names; each refused alone with the right error', bounded, async (t) => {
  const schema = await setup(t, 'hostile');
  if (schema === undefined) return;
  const db = await connect();
  try {
    const bus = newBus(schema);
    const seen = new Map<string, string>();
    bus.subscribe('hostile-publish', Ticked, (message) => {
      seen.set(message.id, message.key);
    });
    await bus.start();

    // Over maxPayloadBytes (256 KiB by default): refused before anything is written.
    const huge = await bus.publish(Ticked, { key: 'big', seq: 1, note: 'x'.repeat(300 * 1024) }).catch((error: unknown) => error);
    assert.ok(huge instanceof TidingsError && huge.code === 'PAYLOAD_TOO_LARGE', `PAYLOAD_TOO_LARGE, got ${String(huge)}`);
    assert.match(huge.message, /over the limit of 262144/);
    assert.equal(await logCount(db, schema), 0);

    // jsonb cannot store NUL. Published alongside valid messages, all gathered into one group commit:
    // only the bad one fails, and it names itself.
    const valid = Array.from({ length: 20 }, (_, seq) => bus.publish(Ticked, { key: `v${seq % 4}`, seq }));
    const nul = bus.publish(Ticked, { key: 'nul', seq: 0, note: 'a\u0000b' }, { id: 'the-nul-message' }).catch((error: unknown) => error);
    const more = Array.from({ length: 20 }, (_, seq) => bus.publish(Ticked, { key: `v${seq % 4}`, seq: 20 + seq }));
    const error = await nul;
    assert.ok(error instanceof TidingsError && error.code === 'INVALID_PAYLOAD', `INVALID_PAYLOAD, got ${String(error)}`);
    assert.equal(error.ref?.id, 'the-nul-message');
    assert.match(error.message, /the-nul-message/);
    const ids = (await Promise.all([...valid, ...more])).map((published) => published.id);
    await waitFor('the 40 valid messages', () => ids.every((id) => seen.has(id)));

    // Names become SQL identifiers or channel payloads nowhere: they are validated, and refused here.
    const hostileNames = [`orders"; drop table log; --`, "orders'; select 1", 'orders;placed', 'заказы.создан', 'orders.placed-🎉', 'Orders.Placed', ''];
    for (const name of hostileNames) {
      assert.throws(() => defineEvent(name, { schema: z.object({}) }), (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_CONTRACT', `event ${JSON.stringify(name)}`);
      assert.throws(() => bus.subscription(name), (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_CONTRACT', `subscription ${JSON.stringify(name)}`);
      assert.throws(() => postgres({ url: DATABASE_URL, schema: name }), (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_OPTIONS', `schema ${JSON.stringify(name)}`);
    }
    // Keys, tenants and subjects are values, always parameters: delivered exactly as given.
    const oddKeys = [`'; drop table "${schema}".log; --`, 'ключ-🔑', 'a"b\\c', '$1::text'];
    const odd = await Promise.all(oddKeys.map((key, seq) => bus.publish(Ticked, { key, seq }, { tenant: key, subject: key })));
    await waitFor('the odd keys', () => odd.every((published) => seen.has(published.id)));
    assert.deepEqual(odd.map((published) => seen.get(published.id)), oddKeys);
    // The admin functions take names as parameters too.
    await assert.rejects(readStatus(db, { schema, subscription: `x'; drop table "${schema}".log; --` }), /has no subscription x'; drop table/);
    assert.equal(await logCount(db, schema), 44, 'the log is intact');
  } finally {
    await db.end();
  }
});

test(
  'strings PostgreSQL cannot store, published alongside valid messages (a lone surrogate in the data, a NUL in a key or tenant): refused alone with INVALID_PAYLOAD, the others committed',
  // A lone surrogate (JSON.stringify writes it as \udXXX, which jsonb rejects: 22P02) or a NUL in a text
  // column (22P05) would fail the shared INSERT of a group commit, and every publish gathered into it.
  bounded,
  async (t) => {
    const schema = await setup(t, 'utf');
    if (schema === undefined) return;
    const bus = newBus(schema);
    await bus.start();
    const outcomes: Record<string, unknown> = {};
    for (const [name, data, options] of [
      ['lone surrogate in data', { key: 'k', seq: 1, note: 'broken \ud800 pair' }, {}],
      ['NUL in a key given in options', { key: 'k', seq: 1 }, { key: 'k\u0000' }],
      ['NUL in tenant', { key: 'k', seq: 1 }, { tenant: 't\u0000' }],
    ] as const) {
      const valid = Array.from({ length: 10 }, (_, seq) => bus.publish(Ticked, { key: 'ok', seq }).then(() => 'ok', (error: Error) => error.message));
      const bad = bus.publish(Ticked, data, { ...options, id: 'the-bad-one' }).then(
        () => 'accepted',
        (error: unknown) => (error instanceof TidingsError ? `${error.code} ${error.ref?.id}` : `raw ${(error as Error).message}`),
      );
      const others = await Promise.all(valid);
      outcomes[name] = { bad: await bad, others: others.every((outcome) => outcome === 'ok') ? 'all committed' : others.find((o) => o !== 'ok') };
    }
    t.diagnostic(JSON.stringify(outcomes));
    const expected = { bad: 'INVALID_PAYLOAD the-bad-one', others: 'all committed' };
    assert.deepEqual(outcomes, { 'lone surrogate in data': expected, 'NUL in a key given in options': expected, 'NUL in tenant': expected });
  },
);

test('deeply nested JSON (5,000 levels) at publish is refused with LIMIT_EXCEEDED (INVALID_PAYLOAD where the schema overflows first), writes nothing, and the bus goes on', bounded, async (t) => {
  const schema = await setup(t, 'deep');
  if (schema === undefined) return;
  const db = await connect();
  try {
    const bus = newBus(schema);
    await bus.start();
    const outcomes: Record<string, string> = {};
    for (const [name, publish] of [
      // The schema accepts anything under `tree`; the payload cannot be serialised (V8 recurses).
      ['z.unknown()', () => bus.publish(Nested, { key: 'n', tree: deepObject(5_000) })],
      // A recursive schema recurses itself.
      ['z.lazy() recursive schema', () => bus.publish(Recursive, { key: 'n', tree: deepObject(5_000) })],
    ] as const) {
      const error = await publish().then(() => undefined, (e: unknown) => e);
      assert.ok(error !== undefined, `${name}: refused`);
      outcomes[name] = error instanceof TidingsError ? error.code : `${(error as Error).name}: ${(error as Error).message}`;
    }
    t.diagnostic(`errors at publish: ${JSON.stringify(outcomes)}`);
    // The depth limit (messageLimits.depth, 64) refuses it before JSON.stringify would overflow; a recursive
    // schema overflows while validating, before the limit is checked.
    assert.deepEqual(outcomes, { 'z.unknown()': 'LIMIT_EXCEEDED', 'z.lazy() recursive schema': 'INVALID_PAYLOAD' });
    assert.equal(await logCount(db, schema), 0, 'nothing written');
    // 60 levels are fine, through the same schemas; 70 are over the limit.
    await bus.publish(Nested, { key: 'n', tree: deepObject(60) });
    await bus.publish(Recursive, { key: 'n', tree: deepObject(60) });
    assert.equal(await logCount(db, schema), 2);
    for (const contract of [Nested, Recursive]) {
      await assert.rejects(bus.publish(contract, { key: 'n', tree: deepObject(70) }), (error: unknown) => error instanceof TidingsError && error.code === 'LIMIT_EXCEEDED' && /nested more than 64/.test(error.message));
    }
    assert.equal(await logCount(db, schema), 2);
  } finally {
    await db.end();
  }
});

test('hostile rows in the log (written by hand): data that breaks the schema, __proto__ and constructor keys, 5,000 levels of nesting; invalid UTF-8 cannot get in. Each contained; the consumer goes on', bounded, async (t) => {
  const schema = await setup(t, 'rows');
  if (schema === undefined) return;
  const db = await connect();
  try {
    const bus = newBus(schema);
    const seen: Array<{ id: string; seq: number; proto: unknown; polluted: unknown }> = [];
    const loose: unknown[] = [];
    // One partition: a row that blocked its lane would block everything after it.
    bus.subscribe(
      'careful',
      Ticked,
      (message) => {
        seen.push({ id: message.id, seq: message.data.seq, proto: Object.getPrototypeOf(message.data), polluted: ({} as Record<string, unknown>).polluted });
      },
      { partitions: 1 },
    );
    bus.subscribe(
      'loose',
      Loose,
      (message) => {
        loose.push({ data: message.data, polluted: ({} as Record<string, unknown>).polluted, ownProto: Object.getPrototypeOf(message.data) === Object.prototype });
      },
      { partitions: 1 },
    );
    await bus.start();

    await bus.publish(Ticked, { key: 'x', seq: 1 });
    await insertRow(db, schema, { id: 'breaks-schema', data: '{"key": "x", "seq": "one"}' });
    await insertRow(db, schema, { id: 'proto-keys', data: '{"key": "x", "seq": 2, "__proto__": {"polluted": "yes"}, "constructor": {"prototype": {"polluted": "yes"}}}' });
    await insertRow(db, schema, { id: 'deep-but-valid', data: `{"key": "x", "seq": 3, "extra": ${deepJson(5_000)}}` });
    // PostgreSQL refuses invalid UTF-8 outright: such a row cannot reach a consumer.
    await assert.rejects(
      db.query(
        `insert into "${schema}".log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         values ('test.ticked', 'bad-utf8', 'test.ticked.v1', 'psql', now(), convert_from('\\x78ff'::bytea, 'UTF8'), 1, 'bad-utf8', '{}')`,
      ),
      (error: Error & { code?: string }) => error.code === '22021',
    );
    // Published through the bus, with keys that a careless merge would turn into prototype pollution.
    const hostile = JSON.parse('{"key": "p", "__proto__": {"polluted": "yes"}, "constructor": {"prototype": {"polluted": "yes"}}, "toString": "not a function"}');
    await bus.publish(Loose, hostile);
    await bus.publish(Ticked, { key: 'x', seq: 4 });

    await waitFor('the valid messages after the hostile rows', () => seen.some((s) => s.seq === 4) && loose.length === 1);
    assert.deepEqual(
      seen.map((s) => s.seq),
      [1, 2, 3, 4],
    );
    for (const s of seen) {
      assert.equal(s.proto, Object.prototype, `${s.id}: data is a plain object`);
      assert.equal(s.polluted, undefined, `${s.id}: Object.prototype not polluted`);
    }
    assert.equal(({} as Record<string, unknown>).polluted, undefined, 'no prototype pollution in this process');
    assert.deepEqual(loose, [{ data: { key: 'p', constructor: { prototype: { polluted: 'yes' } }, toString: 'not a function' }, polluted: undefined, ownProto: true }]);
    // The dead letter is written by the acknowledgement of its batch, which may commit after seq 4's handler ran.
    const deadLetters = async () => (await db.query(`select message_id, reason from "${schema}".dead_letters order by id`)).rows;
    await waitFor('the dead letter committed', async () => (await deadLetters()).length > 0);
    await sleep(100); // a second dead letter, if there were one, would be in the same acknowledgement
    const rows = await deadLetters();
    assert.deepEqual(rows.map((row: { message_id: string }) => row.message_id), ['breaks-schema']);
    assert.match(rows[0].reason, /invalid payload.*seq/);
  } finally {
    await db.end();
  }
});

test(
  'a hand-written row nested 5,000 levels deep that breaks the schema is dead-lettered, and its partition goes on',
  // The dead letter's data once went back to PostgreSQL through JSON.stringify, which overflows at this
  // depth: the acknowledgement failed, the batch was read again and failed again, the partition stuck.
  bounded,
  async (t) => {
    const schema = await setup(t, 'stuck');
    if (schema === undefined) return;
    const db = await connect();
    try {
      const warnings = new Set<string>();
      const bus = newBus(schema, 'faults', { onWarning: (message) => void warnings.add(message) });
      const seen: number[] = [];
      bus.subscribe('careful', Ticked, (message) => void seen.push(message.data.seq), { partitions: 1 });
      await bus.start();
      await insertRow(db, schema, { id: 'deep-and-invalid', data: `{"key": "x", "seq": "one", "extra": ${deepJson(5_000)}}` });
      await bus.publish(Ticked, { key: 'x', seq: 1 });
      const deadLetters = async () => (await db.query(`select message_id from "${schema}".dead_letters`)).rows.map((row: { message_id: string }) => row.message_id);
      const acknowledged = async () => Number((await db.query(`select sum(handled)::int as n from "${schema}".cursors`)).rows[0].n);
      try {
        await waitFor('the deep row in dead letters, and the batch acknowledged', async () => (await deadLetters()).length > 0 && (await acknowledged()) >= 2, 6_000);
      } finally {
        t.diagnostic(`after the deep row: the next message was handled ${seen.length} times; dead letters ${JSON.stringify(await deadLetters())}; acknowledged ${await acknowledged()}; warnings ${JSON.stringify([...new Set([...warnings].map((w) => w.replace(/retrying in \d+ ms/, 'retrying')))])}`);
      }
      assert.deepEqual(await deadLetters(), ['deep-and-invalid']);
      assert.deepEqual(seen, [1], 'the next message handled once, its batch acknowledged');
    } finally {
      await db.end();
    }
  },
);

// ---- back-pressure -------------------------------------------------------------------------------

/** Collects garbage now, so heap figures measure what is retained, not what awaits collection. */
function collectGarbage(): () => void {
  v8.setFlagsFromString('--expose-gc');
  return vm.runInNewContext('gc') as () => void;
}

test('back-pressure: a slow subscription makes neither the publishers nor the process buffer without bound', bounded, async (t) => {
  const schema = await setup(t, 'slow');
  if (schema === undefined) return;
  const gc = collectGarbage();
  // The bus's own pool, wrapped to count what the consumer's reads return: the only way messages enter
  // the process on the consuming side.
  const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 10, application_name: `tidings:${schema}` });
  pool.on('error', () => undefined);
  cleanups.push(() => pool.end());
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
  const bus = newBus(schema, 'slow', { pool: counting });
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

const DAY = 86_400_000;
const Audit = defineEvent('test.audit', { schema: z.object({ n: z.number() }), description: 'No subscription reads it' });
const Kept = defineEvent('test.kept', { schema: z.object({ n: z.number() }), description: 'Kept 30 days by a per-topic age' });

const countWhere = async (db: pg.Client, sql: string, params: unknown[] = []) => Number((await db.query(sql, params)).rows[0].n);

test('retention: handled log rows older than their age go in small batches; rows a subscription has not handled, or a key is held on, stay unless forced; inbox records and dead letters beyond their windows go', bounded, async (t) => {
  const schema = await setup(t, 'ret');
  if (schema === undefined) return;
  const db = await connect();
  try {
    // `live` runs throughout: it holds key h (a retry in a minute) and dead-letters poison messages.
    const live = newBus(schema, 'live');
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
      const bus = newBus(schema, 'paused');
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
    await waitFor('key h held, p dead', async () =>
      (await countWhere(db, `select count(*)::int as n from "${schema}".held`)) === 2 && (await countWhere(db, `select count(*)::int as n from "${schema}".dead_letters`)) === 1,
    );
    await paused.stop();
    const phase2 = await live.publishMany(Ticked, Array.from({ length: 50 }, (_, seq) => ({ key: `k${seq % 10}`, seq: 100 + seq })));
    await live.publishMany(Audit, Array.from({ length: 30 }, (_, n) => ({ n })));
    await live.publishMany(Kept, Array.from({ length: 20 }, (_, n) => ({ n })));
    await waitFor('phase 2 handled by live', async () => (await inbox('live')) === 150);
    // Everything so far is 8 days old; then a few young messages.
    await db.query(`update "${schema}".log set time = time - interval '8 days'`);
    await live.publishMany(Ticked, Array.from({ length: 5 }, (_, seq) => ({ key: 'young', seq })));
    await waitFor('young handled by live', async () => (await inbox('live')) === 155);

    const policy = { schema, batchSize: 10, log: { topics: { 'test.kept': 30 * DAY } }, inbox: { maxAgeMs: null }, deadLetters: { maxAgeMs: null } };
    const first = await prune(db, policy);
    t.diagnostic(`first run: ${JSON.stringify(first)}`);
    // Deleted: phase 1 but the two held rows (101 of 103), and the 30 audit rows no subscription reads.
    // Kept: the 2 held rows and the 50 of phase 2 that `paused` has not handled; not expired: test.kept, young.
    assert.deepEqual(first.log, { examined: 208, expired: 183, deleted: 131, kept: 52 });
    assert.equal(first.statements, 21, 'the log walked 10 rows per statement');
    const byTopic = async () =>
      Object.fromEntries((await db.query(`select topic, count(*)::int as n from "${schema}".log group by topic order by topic`)).rows.map((row: { topic: string; n: number }) => [row.topic, row.n]));
    assert.deepEqual(await byTopic(), { 'test.kept': 20, 'test.ticked': 57 });
    assert.equal(await countWhere(db, `select count(*)::int as n from "${schema}".log l where exists (select 1 from "${schema}".held h where h.position = l.position)`), 2, 'held rows kept');

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
    assert.equal(inboxRun.statements, 5, '50 + 50 + 50 + 50 + 3');
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
});

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
    () => new Retention({ query: async () => ({ rows: [] }) }, { schema: 'tidings', batchSize: 0, intervalMs: 5, log: { maxAgeMs: -1, topics: { 'a.b': 1.5 } } }),
    (error: unknown) =>
      error instanceof TidingsError &&
      error.code === 'INVALID_OPTIONS' &&
      ['log.maxAgeMs', 'log.topics["a.b"]', 'intervalMs', 'batchSize'].every((name) => error.message.includes(name)),
  );
  assert.throws(() => new Retention({ query: async () => ({ rows: [] }) }, { schema: 'x"; drop' }), /schema "x\\"; drop" is invalid/);
});

test('retention racing live consumers (every row pruned the moment it is handled) loses nothing', bounded, async (t) => {
  const schema = await setup(t, 'race');
  if (schema === undefined) return;
  await createEffects(schema);
  const db = await connect();
  try {
    const bus = newBus(schema);
    const fast = new Set<string>();
    bus.subscribe('fast', Ticked, (message) => void fast.add(message.id), { partitions: 2 });
    bus.subscribe(
      'slow',
      Ticked,
      async (message, ctx) => {
        await ctx.tx.query(`insert into "${schema}".effects (message_id, key, seq, worker) values ($1, $2, $3, 0)`, [message.id, message.data.key, message.data.seq]);
      },
      { partitions: 3, batchSize: 20, concurrency: 2 },
    );
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
    await waitFor('both subscriptions done', async () => fast.size === ids.size && (await countWhere(db, `select count(*)::int as n from "${schema}".effects`)) === ids.size, 30_000);
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
  const schema = await setup(t, 'timer');
  if (schema === undefined) return;
  const bus = newBus(schema);
  await bus.start();
  const driver = await pgDriver({ url: DATABASE_URL, poolSize: 2, name: schema });
  cleanups.push(() => driver.close());
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
    await bus.publishMany(Audit, Array.from({ length: 100 }, (_, n) => ({ n })));
    await waitFor('the log pruned', async () => (await logCount(db, schema)) === 0, 15_000);
    await waitFor('six runs', () => runs.length >= 6, 15_000);
    await Promise.all([a.stop(), b.stop()]);
    const stoppedAt = runs.length;
    const ats = runs.map((run) => run.at).sort((x, y) => x - y);
    const gaps = ats.slice(1).map((at, i) => at - ats[i]!);
    t.diagnostic(`runs by ${runs.map((run) => run.who).join('')}; gaps ${gaps.join(', ')} ms`);
    // A turn lasts 90 % of the interval (180 ms): two runs closer than that would be two processes pruning at once.
    assert.ok(gaps.every((gap) => gap >= 120), `one run per turn (gaps ${gaps.join(', ')} ms)`);
    assert.deepEqual(warnings, []);
    await sleep(600); // three intervals: a run after stop() would show here
    assert.equal(runs.length, stoppedAt, 'no run after stop()');
  } finally {
    await db.end();
  }
});

test('tidings prune: the CLI runs the same retention, with --dry-run', bounded, async (t) => {
  const schema = await setup(t, 'cli');
  if (schema === undefined) return;
  const bus = newBus(schema);
  await bus.start();
  await bus.publishMany(Audit, Array.from({ length: 12 }, (_, n) => ({ n })));
  const db = await connect();
  try {
    await db.query(`update "${schema}".log set time = time - interval '2 days'`);
    const run = (args: string[]) =>
      new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
        const child = spawn(process.execPath, [new URL('../bin/tidings.js', import.meta.url).pathname, '--schema', schema, ...args], {
          env: { ...process.env, DATABASE_URL },
          stdio: ['pipe', 'pipe', 'pipe'],
        });
        children.add(child);
        let stdout = '';
        let stderr = '';
        child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
        child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
        const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
        child.on('error', reject);
        child.on('exit', (code) => {
          clearTimeout(timer);
          children.delete(child);
          resolve({ code, stdout, stderr });
        });
      });
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
