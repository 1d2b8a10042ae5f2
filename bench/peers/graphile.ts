/**
 * graphile-worker 0.17 (the newest that runs on Node 20), configured as its performance page recommends
 * for throughput: `localQueue` (batch fetch, size 500), batched completion (`completeJobBatchDelay: 0`),
 * concurrency 24; bulk `addJobs()`; LISTEN/NOTIFY wake-up (its `add_job` notifies).
 */
import { Logger, makeWorkerUtils, run, runMigrations, type Runner, type TaskList, type WorkerUtils } from 'graphile-worker';
import pg from 'pg';
import { queuePeer, runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { Counter, now, pollUntil, produce, rate } from '../load/measure.ts';
import { Schedule } from '../load/scheduled.ts';
import { BUSINESS_INSERT, BUSINESS_NOTE, freshSchema, idlePg, monitorClient, queriesSoFar } from '../load/pg.ts';
import { type Probe, PRODUCERS, type Publisher, type Sides } from '../load/sides.ts';
import type { ChildResult, Task } from '../protocol.ts';

const SCHEMA = 'graphile_bench';
const TASK = 'bench';
const CONCURRENCY = 24;
const CHUNK = 1_000;
const silent = new Logger(() => (level, message) => {
  if (level === 'error') console.error('[graphile-worker]', message);
});

async function freshStore(task: Task): Promise<WorkerUtils> {
  await freshSchema(task, SCHEMA);
  await runMigrations({ connectionString: task.pgUrl, schema: SCHEMA, logger: silent });
  return makeWorkerUtils({ connectionString: task.pgUrl, schema: SCHEMA, logger: silent });
}

function startRunner(task: Task, taskList: TaskList): Promise<Runner> {
  return run({
    connectionString: task.pgUrl,
    schema: SCHEMA,
    concurrency: CONCURRENCY,
    maxPoolSize: CONCURRENCY + 2,
    noHandleSignals: true,
    logger: silent,
    taskList,
    preset: { worker: { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } },
  });
}

function handlerFor(task: Task, probe: Probe): TaskList[string] {
  return async (payload, helpers) => {
    probe.start((payload as BenchEvent).seq);
    if (task.variant.effects) await helpers.query('insert into bench_effects (id) values ($1)', [helpers.job.id]);
    probe.end();
  };
}

const counting = (counter: Counter): Probe => ({ start: () => undefined, end: () => counter.add() });

/** Completed jobs are deleted: the work is acknowledged when no job is left. */
async function remaining(task: Task): Promise<() => Promise<number>> {
  const client = await monitorClient(task.pgUrl);
  return async () => {
    const { rows } = await client.query<{ n: string }>(`select count(*) as n from ${SCHEMA}._private_jobs`);
    return Number(rows[0]?.n ?? 0);
  };
}

function specs(identifier: string, first: number, n: number, keys: number) {
  return Array.from({ length: n }, (_, i) => ({ identifier, payload: makeEvent(first + i, keys) }));
}

async function bulk(task: Task): Promise<ChildResult> {
  const utils = await freshStore(task);
  const chunks = Array.from({ length: Math.ceil(task.events / CHUNK) }, (_, c) =>
    specs(TASK, c * CHUNK, Math.min(CHUNK, task.events - c * CHUNK), task.variant.keys),
  );
  const t0 = now();
  for (const chunk of chunks) await utils.addJobs(chunk);
  const ms = now() - t0;
  await utils.release();
  return { ok: true, metrics: { rate: rate(task.events, ms) } };
}

async function drain(task: Task): Promise<ChildResult> {
  const utils = await freshStore(task);
  for (let first = 0; first < task.events; first += CHUNK) {
    await utils.addJobs(specs(TASK, first, Math.min(CHUNK, task.events - first), task.variant.keys));
  }
  const counter = new Counter();
  const left = await remaining(task);
  const q0 = queriesSoFar();
  const t0 = now();
  const runner = await startRunner(task, { [TASK]: handlerFor(task, counting(counter)) });
  await counter.until(task.events, task.timeoutMs);
  const handledMs = now() - t0;
  await pollUntil(async () => (await left()) === 0, 60_000, 'no job left');
  const ms = now() - t0;
  await runner.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return { ok: true, metrics: { rate: rate(task.events, ms), handlerRate: rate(task.events, handledMs), queriesPerEvent } };
}

/**
 * How the task's producers enqueue: workload 3 in the producer's own transaction with the `add_job` SQL
 * function (the documented way to enqueue from a transaction; with the business row before it), workloads
 * 4 and 5 `addJob()` on its own.
 */
function publisherOf(task: Task, utils: WorkerUtils): Publisher {
  const event = (seq: number) => makeEvent(seq, task.variant.keys, task.variant.payloadBytes);
  if (task.workload !== 'e2e') return { publish: (seq) => utils.addJob(TASK, event(seq)), stop: async () => utils.release() };
  const producers = new pg.Pool({ connectionString: task.pgUrl, max: PRODUCERS });
  return {
    publish: async (seq) => {
      const client = await producers.connect();
      try {
        await client.query('begin');
        if (task.variant.businessRow === true) await client.query(BUSINESS_INSERT, [seq, BUSINESS_NOTE]);
        await client.query(`select ${SCHEMA}.add_job($1, $2::json)`, [TASK, JSON.stringify(event(seq))]);
        await client.query('commit');
      } finally {
        client.release();
      }
    },
    stop: async () => {
      await producers.end();
      await utils.release();
    },
  };
}

const sides: Sides = {
  servers: ['postgres'],
  async prepare(task) {
    await (await freshStore(task)).release();
  },
  async consumer(task, probe) {
    const runner = await startRunner(task, { [TASK]: handlerFor(task, probe) });
    const left = await remaining(task);
    return { acknowledged: async () => (await left()) === 0, stop: () => runner.stop() };
  },
  publisher: async (task) => publisherOf(task, await makeWorkerUtils({ connectionString: task.pgUrl, schema: SCHEMA, logger: silent })),
  idle: idlePg,
};

/** Fan-out: no pub/sub in graphile-worker; one job per subscriber task, all added in one `addJobs` call. */
async function fanout(task: Task): Promise<ChildResult> {
  const utils = await freshStore(task);
  const counter = new Counter();
  const identifiers = Array.from({ length: task.fanout }, (_, i) => `fan${i}`);
  const taskList: TaskList = {};
  for (const identifier of identifiers) taskList[identifier] = handlerFor(task, counting(counter));
  const runner = await startRunner(task, taskList);
  const left = await remaining(task);
  const deliveries = task.events * task.fanout;
  const q0 = queriesSoFar();
  const t0 = now();
  await produce(task.events, PRODUCERS, async (seq) => {
    const payload = makeEvent(seq, task.variant.keys);
    await utils.addJobs(identifiers.map((identifier) => ({ identifier, payload })));
  });
  const producedMs = now() - t0;
  await counter.until(deliveries, task.timeoutMs);
  await pollUntil(async () => (await left()) === 0, 60_000, 'no job left');
  const ms = now() - t0;
  await runner.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return { ok: true, metrics: { rate: rate(deliveries, ms), producerRate: rate(task.events, producedMs), queriesPerEvent } };
}

/** Scheduled delivery: jobs added with `runAt` (1,000 per `addJobs()`), the drain's runner. */
async function scheduled(task: Task): Promise<ChildResult> {
  const utils = await freshStore(task);
  const schedule = new Schedule(task);
  const runner = await startRunner(task, { [TASK]: handlerFor(task, { start: (seq) => schedule.started(seq), end: () => undefined }) });
  await schedule.scheduleAll(CHUNK, false, (seqs) =>
    utils.addJobs(seqs.map((seq) => ({ identifier: TASK, payload: makeEvent(seq, task.variant.keys), runAt: new Date(schedule.dueOf(seq)) }))),
  );
  const result = await schedule.done();
  await runner.stop();
  await utils.release();
  return result;
}

runChild(queuePeer({ sides, scheduled, bulk, drain, fanout }));
