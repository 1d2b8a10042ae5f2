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
import { createBus, deadLetter, defineEvent, keyHash, newId, retryLater, TidingsError, ValidationError, type Bus } from '../src/index.ts';
import { postgres, readStatus, tailTopic, type PgPoolLike, type PgTransaction, type PostgresOptions } from '../src/postgres/index.ts';
import { pgDriver } from '../src/postgres/driver.ts';
import { prune, resolveRetention, Retention, retentionDefaults, type PruneResult } from '../src/postgres/retention.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, DATABASE_URL, dropSchema, requirePostgres, sleep, uniqueSchema, waitFor } from './helpers.ts';

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
  const bus = createBus({
    service,
    backbone: postgres({ url: DATABASE_URL, schema, leaseMs: 2_000, heartbeatMs: 500, pollMs: 1_000, onWarning: () => undefined, ...options }),
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

async function createEffects(schema: string): Promise<void> {
  const client = await connect();
  try {
    await client.query(`create schema if not exists "${schema}"`);
    await client.query(
      `create table "${schema}".effects (n bigserial primary key, message_id text not null, key text not null, seq int not null, worker int not null)`,
    );
  } finally {
    await client.end();
  }
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
