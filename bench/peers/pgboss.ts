/**
 * pg-boss 10 (the newest that runs on Node 20). Throughput setup: several `work()` loops fetching batches
 * (`batchSize`), the minimum polling interval (0.5 s; pg-boss 10 has no LISTEN wake-up), bulk `insert()`.
 * performance.md's sweep found 4 loops x 500 the best here.
 */
import pg from 'pg';
import PgBoss from 'pg-boss';
import { runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { latencyPhases } from '../load/latency.ts';
import { Counter, measuredAmount, now, pollUntil, produce, rate, warmUp, warmedDrain } from '../load/measure.ts';
import { freshSchema, idlePg, monitorClient, queriesSoFar } from '../load/pg.ts';
import type { ChildResult, Task } from '../protocol.ts';

const SCHEMA = 'pgboss_bench';
const QUEUE = 'bench';
const LOOPS = 4;
const BATCH = 500;
const POLL_SECONDS = 0.5;
const PRODUCERS = 10;
const CHUNK = 1_000;

async function startBoss(task: Task, queues: string[] = [QUEUE]): Promise<PgBoss> {
  const boss = new PgBoss({ connectionString: task.pgUrl, schema: SCHEMA });
  boss.on('error', (error: unknown) => console.error('[pg-boss]', error));
  await boss.start();
  for (const queue of queues) await boss.createQueue(queue);
  return boss;
}

/** Each work() loop's handler: the whole batch, one message after another (as one transaction would). */
function handlerFor(_task: Task, counter: Counter, effects: pg.Pool | undefined, probe?: { fn: (seq: number) => void }) {
  return async (jobs: PgBoss.Job<BenchEvent>[]) => {
    for (const job of jobs) {
      probe?.fn(job.data.seq);
      if (effects !== undefined) await effects.query('insert into bench_effects (id) values ($1)', [job.id]);
      counter.add();
    }
  };
}

async function work(boss: PgBoss, _task: Task, queue: string, handler: (jobs: PgBoss.Job<BenchEvent>[]) => Promise<void>): Promise<void> {
  for (let i = 0; i < LOOPS; i++) {
    await boss.work<BenchEvent>(queue, { batchSize: BATCH, pollingIntervalSeconds: POLL_SECONDS }, handler);
  }
}

function effectsPool(task: Task): pg.Pool | undefined {
  return task.variant.effects ? new pg.Pool({ connectionString: task.pgUrl, max: LOOPS }) : undefined;
}

/** pg-boss completes a batch after the handler returns, without awaiting it: count what the store says. */
async function completed(task: Task, queues: string[]): Promise<() => Promise<number>> {
  const client = await monitorClient(task.pgUrl);
  return async () => {
    const { rows } = await client.query<{ n: string }>(`select count(*) as n from ${SCHEMA}.job where name = any($1::text[]) and state = 'completed'`, [
      queues,
    ]);
    return Number(rows[0]?.n ?? 0);
  };
}

function jobs(queue: string, first: number, n: number, keys: number): PgBoss.JobInsert<BenchEvent>[] {
  return Array.from({ length: n }, (_, i) => ({ name: queue, data: makeEvent(first + i, keys) }));
}

async function bulk(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const boss = await startBoss(task);
  const chunks = Array.from({ length: Math.ceil(task.events / CHUNK) }, (_, c) =>
    jobs(QUEUE, c * CHUNK, Math.min(CHUNK, task.events - c * CHUNK), task.variant.keys),
  );
  const t0 = now();
  for (const chunk of chunks) await boss.insert(chunk);
  const ms = now() - t0;
  return { ok: true, metrics: { rate: rate(task.events, ms) } };
}

async function drain(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const boss = await startBoss(task);
  for (let first = 0; first < task.events; first += CHUNK) {
    await boss.insert(jobs(QUEUE, first, Math.min(CHUNK, task.events - first), task.variant.keys));
  }
  const counter = new Counter();
  const done = await completed(task, [QUEUE]);
  const q0 = queriesSoFar();
  const t0 = now();
  const effects = effectsPool(task);
  await work(boss, task, QUEUE, handlerFor(task, counter, effects));
  await counter.until(task.events, task.timeoutMs);
  const handledMs = now() - t0;
  await pollUntil(async () => (await done()) >= task.events, 60_000, 'all completed');
  const ms = now() - t0;
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  // The measured drain runs after a warm-up in the same process (warmedDrain): leave nothing running.
  await boss.stop({ graceful: true, wait: true });
  await effects?.end();
  return { ok: true, metrics: { rate: rate(task.events, ms), handlerRate: rate(task.events, handledMs), queriesPerEvent } };
}

/**
 * Workload 3: each event in the producer's own transaction (BEGIN; send with `{ db }`; COMMIT), pg-boss's
 * way to enqueue inside an application transaction. Workload 4: a plain `send()`.
 */
async function endToEnd(task: Task, standalone: boolean): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const boss = await startBoss(task);
  const counter = new Counter();
  await work(boss, task, QUEUE, handlerFor(task, counter, effectsPool(task)));
  const done = await completed(task, [QUEUE]);
  const producers = new pg.Pool({ connectionString: task.pgUrl, max: PRODUCERS });
  const publishOne = async (seq: number) => {
    const event = makeEvent(seq, task.variant.keys);
    if (standalone) {
      await boss.send(QUEUE, event);
      return;
    }
    const client = await producers.connect();
    try {
      await client.query('begin');
      await boss.send(QUEUE, event, { db: { executeSql: (text: string, values: unknown[]) => client.query(text, values) } });
      await client.query('commit');
    } finally {
      client.release();
    }
  };
  const warm = await warmUp(task, PRODUCERS, publishOne, { counter, acknowledged: async (n) => (await done()) >= n });
  const q0 = queriesSoFar();
  const t0 = now();
  const events = await produce(measuredAmount(task), PRODUCERS, publishOne);
  const producedMs = now() - t0;
  await counter.until(warm + events, task.timeoutMs);
  await pollUntil(async () => (await done()) >= warm + events, 60_000, 'all completed');
  const ms = now() - t0;
  const queriesPerEvent = (queriesSoFar() - q0) / events;
  return { ok: true, metrics: { events, rate: rate(events, ms), producerRate: rate(events, producedMs), queriesPerEvent } };
}

/** Fan-out: its pub/sub (`subscribe(event, queue)`, `publish(event, data)`), one queue per subscriber. */
async function fanout(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const queues = Array.from({ length: task.fanout }, (_, i) => `fan${i}`);
  const boss = await startBoss(task, queues);
  const counter = new Counter();
  for (const queue of queues) {
    await boss.subscribe('bench.event', queue);
    await boss.work<BenchEvent>(queue, { batchSize: BATCH, pollingIntervalSeconds: POLL_SECONDS }, handlerFor(task, counter, undefined));
  }
  const done = await completed(task, queues);
  const deliveries = task.events * task.fanout;
  const q0 = queriesSoFar();
  const t0 = now();
  await produce(task.events, PRODUCERS, async (seq) => {
    await boss.publish('bench.event', makeEvent(seq, task.variant.keys));
  });
  const producedMs = now() - t0;
  await counter.until(deliveries, task.timeoutMs);
  await pollUntil(async () => (await done()) >= deliveries, 60_000, 'all completed');
  const ms = now() - t0;
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return { ok: true, metrics: { rate: rate(deliveries, ms), producerRate: rate(task.events, producedMs), queriesPerEvent } };
}

async function latency(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const boss = await startBoss(task);
  const counter = new Counter();
  const probe = { fn: (_seq: number) => undefined as void };
  await work(boss, task, QUEUE, handlerFor(task, counter, effectsPool(task), probe));
  const { metrics, series } = await latencyPhases(
    task,
    ['postgres'],
    (seq) => boss.send(QUEUE, makeEvent(seq, task.variant.keys)),
    (fn) => {
      probe.fn = fn;
    },
  );
  Object.assign(metrics, await idlePg(task));
  return { ok: true, metrics, series };
}

runChild({
  bulk,
  drain: warmedDrain(drain),
  e2e: (task) => endToEnd(task, false),
  standalone: (task) => endToEnd(task, true),
  fanout,
  latency,
});
