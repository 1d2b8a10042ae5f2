/**
 * BullMQ on Redis (no persistence on this machine: not durable, unlike the PostgreSQL systems).
 * Throughput setup per its docs: `addBulk` for bulk, worker concurrency (100 to burn down a backlog,
 * 10 elsewhere, as in performance.md), completed jobs removed (`removeOnComplete`).
 */
import { Queue, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import pg from 'pg';
import { queuePeer, runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { Counter, now, pollUntil, produce, rate, sleep } from '../load/measure.ts';
import { ensureEffectsTable } from '../load/pg.ts';
import { Schedule } from '../load/scheduled.ts';
import { type Probe, PRODUCERS, type Sides } from '../load/sides.ts';
import type { ChildResult, Task } from '../protocol.ts';

const PREFIX = 'tbench';
const CHUNK = 1_000;
const DRAIN_CONCURRENCY = 100;
const CONCURRENCY = 10;
const jobOptions = { removeOnComplete: true, removeOnFail: 1_000 };

function connection(task: Task) {
  return { host: task.redis.host, port: task.redis.port, maxRetriesPerRequest: null };
}

/** A queue of its own for each run, emptied first. */
async function freshQueue(task: Task, name = `bench-${process.pid}`): Promise<Queue> {
  const queue = new Queue(name, { connection: connection(task), prefix: PREFIX });
  await queue.obliterate({ force: true });
  if (task.variant.effects) await ensureEffectsTable(task.pgUrl);
  return queue;
}

function startWorker(task: Task, queue: Queue, concurrency: number, probe: Probe): Worker {
  const effects = task.variant.effects ? new pg.Pool({ connectionString: task.pgUrl, max: 10 }) : undefined;
  const worker = new Worker(
    queue.name,
    async (job: Job<BenchEvent>) => {
      probe.start(job.data.seq);
      if (effects !== undefined) await effects.query('insert into bench_effects (id) values ($1)', [`${queue.name}:${job.id}`]);
      probe.end();
    },
    { connection: connection(task), prefix: PREFIX, concurrency },
  );
  worker.on('error', (error) => console.error('[bullmq]', error));
  return worker;
}

const counting = (counter: Counter): Probe => ({ start: () => undefined, end: () => counter.add() });

/** Jobs not yet completed (completed ones are removed). */
async function pending(queues: Queue[]): Promise<number> {
  let n = 0;
  for (const queue of queues) {
    const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'prioritized', 'waiting-children');
    n += Object.values(counts).reduce((a, b) => a + b, 0);
  }
  return n;
}

async function bulk(task: Task): Promise<ChildResult> {
  const queue = await freshQueue(task);
  const chunks = Array.from({ length: Math.ceil(task.events / CHUNK) }, (_, c) =>
    Array.from({ length: Math.min(CHUNK, task.events - c * CHUNK) }, (_, i) => ({
      name: 'bench',
      data: makeEvent(c * CHUNK + i, task.variant.keys),
      opts: jobOptions,
    })),
  );
  const t0 = now();
  for (const chunk of chunks) await queue.addBulk(chunk);
  const ms = now() - t0;
  await queue.obliterate({ force: true });
  return { ok: true, metrics: { rate: rate(task.events, ms) } };
}

async function drain(task: Task): Promise<ChildResult> {
  const queue = await freshQueue(task);
  for (let first = 0; first < task.events; first += CHUNK) {
    const n = Math.min(CHUNK, task.events - first);
    await queue.addBulk(Array.from({ length: n }, (_, i) => ({ name: 'bench', data: makeEvent(first + i, task.variant.keys), opts: jobOptions })));
  }
  const counter = new Counter();
  const t0 = now();
  const worker = startWorker(task, queue, DRAIN_CONCURRENCY, counting(counter));
  await counter.until(task.events, task.timeoutMs);
  const handledMs = now() - t0;
  await pollUntil(async () => (await pending([queue])) === 0, 60_000, 'no job pending');
  const ms = now() - t0;
  await worker.close();
  await queue.obliterate({ force: true });
  return { ok: true, metrics: { rate: rate(task.events, ms), handlerRate: rate(task.events, handledMs) } };
}

/** The queue of the e2e and latency workloads: one name for the task, shared by its two processes. */
const queueName = (task: Task) => `bench-${task.label.replace(/[^a-z0-9]+/gi, '-')}`;

/** Workloads 3, 4 and 5 are the same here: Redis has no transaction to join, each event is one `add()`. */
const sides: Sides = {
  servers: ['redis-server'],
  async prepare(task) {
    await (await freshQueue(task, queueName(task))).close();
  },
  async consumer(task, probe) {
    const queue = new Queue(queueName(task), { connection: connection(task), prefix: PREFIX });
    const worker = startWorker(task, queue, CONCURRENCY, probe);
    await worker.waitUntilReady();
    return {
      acknowledged: async () => (await pending([queue])) === 0,
      stop: async () => {
        await worker.close();
        await queue.obliterate({ force: true });
        await queue.close();
      },
    };
  },
  async publisher(task) {
    const queue = new Queue(queueName(task), { connection: connection(task), prefix: PREFIX });
    return { publish: (seq) => queue.add('bench', makeEvent(seq, task.variant.keys, task.variant.payloadBytes), jobOptions), stop: () => queue.close() };
  },
  idle: idleRedis,
};

/** Fan-out: one queue (and worker) per subscriber; each event is added to every queue. */
async function fanout(task: Task): Promise<ChildResult> {
  const queues = await Promise.all(Array.from({ length: task.fanout }, (_, i) => freshQueue(task, `bench-${process.pid}-fan${i}`)));
  const counter = new Counter();
  const workers = queues.map((queue) => startWorker(task, queue, CONCURRENCY, counting(counter)));
  await Promise.all(workers.map((worker) => worker.waitUntilReady()));
  const deliveries = task.events * task.fanout;
  const t0 = now();
  await produce(task.events, PRODUCERS, async (seq) => {
    const event = makeEvent(seq, task.variant.keys);
    await Promise.all(queues.map((queue) => queue.add('bench', event, jobOptions)));
  });
  const producedMs = now() - t0;
  await counter.until(deliveries, task.timeoutMs);
  await pollUntil(async () => (await pending(queues)) === 0, 60_000, 'no job pending');
  const ms = now() - t0;
  await Promise.all(workers.map((worker) => worker.close()));
  for (const queue of queues) await queue.obliterate({ force: true });
  return { ok: true, metrics: { rate: rate(deliveries, ms), producerRate: rate(task.events, producedMs) } };
}

/** Commands per second Redis serves while the worker idles (server-wide counter, less our own INFO calls). */
async function idleRedis(task: Task): Promise<Record<string, number>> {
  if (task.idleSeconds <= 0) return {};
  const redis = new Redis({ host: task.redis.host, port: task.redis.port });
  const processed = async () => Number(/total_commands_processed:(\d+)/.exec(await redis.info('stats'))?.[1] ?? 0);
  await sleep(1_500);
  const c0 = await processed();
  const t0 = now();
  await sleep(task.idleSeconds * 1000);
  const c1 = await processed();
  const seconds = (now() - t0) / 1000;
  redis.disconnect();
  return { idleQueries: Math.max(0, c1 - c0 - 1) / seconds };
}

/** Scheduled delivery: delayed jobs (`delay` = due - now when added, 1,000 per `addBulk()`), the drain's worker. */
async function scheduled(task: Task): Promise<ChildResult> {
  const queue = await freshQueue(task);
  const schedule = new Schedule(task);
  const worker = startWorker(task, queue, DRAIN_CONCURRENCY, { start: (seq) => schedule.started(seq), end: () => undefined });
  await worker.waitUntilReady();
  await schedule.scheduleAll(CHUNK, false, (seqs) =>
    queue.addBulk(
      seqs.map((seq) => ({
        name: 'bench',
        data: makeEvent(seq, task.variant.keys),
        opts: { ...jobOptions, delay: Math.max(0, schedule.dueOf(seq) - Date.now()) },
      })),
    ),
  );
  const result = await schedule.done();
  await worker.close();
  await queue.obliterate({ force: true });
  return result;
}

runChild(queuePeer({ sides, scheduled, bulk, drain, fanout }));
