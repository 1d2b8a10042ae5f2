/**
 * pg-boss 10 (the newest that runs on Node 20). Throughput setup: several `work()` loops fetching batches
 * (`batchSize`), the minimum polling interval (0.5 s; pg-boss 10 has no LISTEN wake-up), bulk `insert()`.
 * performance.md's sweep found 4 loops x 500 the best here.
 */
import pg from 'pg';
import PgBoss from 'pg-boss';
import { queuePeer, runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { Counter, now, pollUntil, produce, rate } from '../load/measure.ts';
import { Schedule } from '../load/scheduled.ts';
import { BUSINESS_INSERT, BUSINESS_NOTE, freshSchema, idlePg, monitorClient, queriesSoFar } from '../load/pg.ts';
import { type Probe, PRODUCERS, type Publisher, type Sides } from '../load/sides.ts';
import type { ChildResult, Task } from '../protocol.ts';

const SCHEMA = 'pgboss_bench';
const QUEUE = 'bench';
const LOOPS = 4;
const BATCH = 500;
const POLL_SECONDS = 0.5;
const CHUNK = 1_000;

async function startBoss(task: Task, queues: string[] = [QUEUE]): Promise<PgBoss> {
  const boss = new PgBoss({ connectionString: task.pgUrl, schema: SCHEMA });
  boss.on('error', (error: unknown) => console.error('[pg-boss]', error));
  await boss.start();
  for (const queue of queues) await boss.createQueue(queue);
  return boss;
}

/** Each work() loop's handler: the whole batch, one message after another (as one transaction would). */
function handlerFor(effects: pg.Pool | undefined, probe: Probe) {
  return async (jobs: PgBoss.Job<BenchEvent>[]) => {
    for (const job of jobs) {
      probe.start(job.data.seq);
      if (effects !== undefined) await effects.query('insert into bench_effects (id) values ($1)', [job.id]);
      probe.end();
    }
  };
}

/** Starts the work() loops; returns their ids (for `notifyWorker`). */
async function work(boss: PgBoss, queue: string, handler: (jobs: PgBoss.Job<BenchEvent>[]) => Promise<void>): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < LOOPS; i++) {
    ids.push(await boss.work<BenchEvent>(queue, { batchSize: BATCH, pollingIntervalSeconds: POLL_SECONDS }, handler));
  }
  return ids;
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

const counting = (counter: Counter): Probe => ({ start: () => undefined, end: () => counter.add() });

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
  await work(boss, QUEUE, handlerFor(effects, counting(counter)));
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
 * How the task's producers enqueue: workload 3 in the producer's own transaction (BEGIN; [the business row;]
 * send with `{ db }`; COMMIT), pg-boss's way to enqueue inside an application transaction; workloads 4 and 5
 * a plain `send()`.
 */
function publisherOf(task: Task, boss: PgBoss): Publisher {
  const event = (seq: number) => makeEvent(seq, task.variant.keys, task.variant.payloadBytes);
  if (task.workload !== 'e2e') return { publish: (seq) => boss.send(QUEUE, event(seq)), stop: async () => undefined };
  const producers = new pg.Pool({ connectionString: task.pgUrl, max: PRODUCERS });
  return {
    publish: async (seq) => {
      const client = await producers.connect();
      try {
        await client.query('begin');
        if (task.variant.businessRow === true) await client.query(BUSINESS_INSERT, [seq, BUSINESS_NOTE]);
        await boss.send(QUEUE, event(seq), { db: { executeSql: (text: string, values: unknown[]) => client.query(text, values) } });
        await client.query('commit');
      } finally {
        client.release();
      }
    },
    stop: () => producers.end(),
  };
}

const sides: Sides = {
  servers: ['postgres'],
  prepare: (task) => freshSchema(task, SCHEMA),
  async consumer(task, probe) {
    const boss = await startBoss(task);
    const effects = effectsPool(task);
    const workers = await work(boss, QUEUE, handlerFor(effects, probe));
    const done = await completed(task, [QUEUE]);
    const own = publisherOf(task, boss);
    // A pg-boss user publishing in the worker's process wakes it after each send (`notifyWorker`) rather
    // than waiting for its next poll: the latency rows do (one loop each time, in turn).
    let next = 0;
    const local: Publisher =
      task.workload === 'latency'
        ? {
            publish: async (seq) => {
              await own.publish(seq);
              boss.notifyWorker(workers[next++ % workers.length]!);
            },
            stop: own.stop,
          }
        : own;
    return {
      acknowledged: async (n) => (await done()) >= n,
      local,
      stop: async () => {
        await boss.stop({ graceful: true, wait: true });
        await effects?.end();
      },
    };
  },
  async publisher(task) {
    const boss = new PgBoss({ connectionString: task.pgUrl, schema: SCHEMA, supervise: false, schedule: false });
    boss.on('error', (error: unknown) => console.error('[pg-boss]', error));
    await boss.start();
    const own = publisherOf(task, boss);
    return {
      publish: own.publish,
      stop: async () => {
        await own.stop();
        await boss.stop({ graceful: true, wait: true });
      },
    };
  },
  idle: idlePg,
};

/** Fan-out: its pub/sub (`subscribe(event, queue)`, `publish(event, data)`), one queue per subscriber. */
async function fanout(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const queues = Array.from({ length: task.fanout }, (_, i) => `fan${i}`);
  const boss = await startBoss(task, queues);
  const counter = new Counter();
  for (const queue of queues) {
    await boss.subscribe('bench.event', queue);
    await boss.work<BenchEvent>(queue, { batchSize: BATCH, pollingIntervalSeconds: POLL_SECONDS }, handlerFor(undefined, counting(counter)));
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
  // Stopped before the measured run (the warm-up runs this first in the same process) drops the schema its workers still poll.
  await boss.stop({ graceful: true, wait: true });
  return { ok: true, metrics: { rate: rate(deliveries, ms), producerRate: rate(task.events, producedMs), queriesPerEvent } };
}

/** Scheduled delivery: jobs inserted with `startAfter` (1,000 per `insert()`), the drain's work() loops. */
async function scheduled(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const boss = await startBoss(task);
  const schedule = new Schedule(task);
  await work(boss, QUEUE, handlerFor(undefined, { start: (seq) => schedule.started(seq), end: () => undefined }));
  await schedule.scheduleAll(CHUNK, false, (seqs) =>
    boss.insert(seqs.map((seq) => ({ name: QUEUE, data: makeEvent(seq, task.variant.keys), startAfter: new Date(schedule.dueOf(seq)) }))),
  );
  const result = await schedule.done();
  await boss.stop({ graceful: true, wait: true });
  return result;
}

runChild(queuePeer({ sides, scheduled, bulk, drain, fanout }));
