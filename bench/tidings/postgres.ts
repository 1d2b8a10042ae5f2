/** Tidings on its PostgreSQL backbone. One process per task; a fresh schema each time. */
import { z } from 'zod';
import type { Bus, HandlerContext, Message } from '../../src/index.ts';
import type { PgTransaction } from '../../src/postgres/index.ts';
import { runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { latencyPhases } from '../load/latency.ts';
import { Counter, measuredAmount, now, pollUntil, produce, rate, warmUp, warmedDrain } from '../load/measure.ts';
import { freshSchema, idlePg, monitorClient, queriesSoFar } from '../load/pg.ts';
import { tidings } from './build.ts';
import type { ChildResult, Task } from '../protocol.ts';

const { createBus, defineEvent } = await tidings<typeof import('../../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../../src/postgres/index.ts')>('postgres/index');

const SCHEMA = 'tidings_bench';
const PRODUCERS = 10;
const CHUNK = 1_000;

const Ev = defineEvent('bench.event', {
  schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }),
  key: (e) => e.key,
});

type Tx = PgTransaction;
type Handler = (message: Message<BenchEvent>, ctx: HandlerContext<Tx>) => Promise<void>;

function newBus(task: Task): Bus<Tx> {
  return createBus({ service: 'bench', backbone: postgres({ url: task.pgUrl, schema: SCHEMA }) });
}

/** The handler of the task's variant: a no-op, or one insert through the message's transaction. */
function handlerFor(task: Task, counter: Counter, probe?: { fn: (seq: number) => void }): Handler {
  if (task.variant.effects) {
    return async (message, ctx) => {
      probe?.fn(message.data.seq);
      await ctx.tx.query('insert into bench_effects (id) values ($1)', [message.id]);
      counter.add();
    };
  }
  return async (message) => {
    probe?.fn(message.data.seq);
    counter.add();
  };
}

function subscribeOptions(task: Task, startFrom: 'now' | 'beginning') {
  return { concurrency: 8, partitions: 4, batchSize: 500, inbox: task.variant.inbox, startFrom };
}

/** Acknowledged messages of `subscriptions`, as the consumers' cursors count them. */
async function acknowledged(task: Task, subscriptions: string[]): Promise<() => Promise<number>> {
  const client = await monitorClient(task.pgUrl);
  return async () => {
    const { rows } = await client.query<{ n: string | null }>(`select sum(handled) as n from ${SCHEMA}.cursors where subscription = any($1::text[])`, [
      subscriptions,
    ]);
    return Number(rows[0]?.n ?? 0);
  };
}

async function publishBacklog(task: Task, total: number): Promise<void> {
  const bus = newBus(task);
  await bus.transaction(async () => undefined); // opens and migrates
  for (let first = 0; first < total; first += CHUNK) {
    const chunk = Array.from({ length: Math.min(CHUNK, total - first) }, (_, i) => makeEvent(first + i, task.variant.keys));
    await bus.publishMany(Ev, chunk);
  }
  await bus.stop();
}

async function bulk(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const bus = newBus(task);
  await bus.transaction(async () => undefined);
  const chunks = Math.ceil(task.events / CHUNK);
  const data = Array.from({ length: chunks }, (_, c) =>
    Array.from({ length: Math.min(CHUNK, task.events - c * CHUNK) }, (_, i) => makeEvent(c * CHUNK + i, task.variant.keys)),
  );
  const t0 = now();
  for (const chunk of data) {
    await bus.transaction(async (tx) => {
      await bus.publishMany(Ev, chunk, { tx });
    });
  }
  const ms = now() - t0;
  await bus.stop();
  return { ok: true, metrics: { rate: rate(task.events, ms) } };
}

async function drain(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  await publishBacklog(task, task.events);
  const counter = new Counter();
  const bus = newBus(task);
  await bus.transaction(async () => undefined);
  bus.subscribe('drain', Ev, handlerFor(task, counter), subscribeOptions(task, 'beginning'));
  const acked = await acknowledged(task, ['drain']);
  const q0 = queriesSoFar();
  const t0 = now();
  await bus.start();
  await counter.until(task.events, task.timeoutMs);
  const handledMs = now() - t0;
  await pollUntil(async () => (await acked()) >= task.events, 30_000, 'all acknowledged');
  const ms = now() - t0;
  await bus.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return { ok: true, metrics: { rate: rate(task.events, ms), handlerRate: rate(task.events, handledMs), queriesPerEvent } };
}

/** Workloads 3 and 4: 10 producers, one event per transaction (e2e) or standalone publishes. */
async function endToEnd(task: Task, standalone: boolean): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const counter = new Counter();
  const bus = newBus(task);
  const consuming = task.variant.producersOnly !== true;
  if (consuming) bus.subscribe('e2e', Ev, handlerFor(task, counter), subscribeOptions(task, 'now'));
  await bus.start();
  const acked = await acknowledged(task, ['e2e']);
  const publishOne = async (seq: number) => {
    const event = makeEvent(seq, task.variant.keys);
    if (standalone) await bus.publish(Ev, event);
    else await bus.transaction(async (tx) => bus.publish(Ev, event, { tx }));
  };
  const warm = await warmUp(task, PRODUCERS, publishOne, consuming ? { counter, acknowledged: async (n) => (await acked()) >= n } : undefined);
  const q0 = queriesSoFar();
  const t0 = now();
  const events = await produce(measuredAmount(task), PRODUCERS, publishOne);
  const producedMs = now() - t0;
  if (consuming) {
    await counter.until(warm + events, task.timeoutMs);
    await pollUntil(async () => (await acked()) >= warm + events, 30_000, 'all acknowledged');
  }
  const ms = now() - t0;
  await bus.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / events;
  return { ok: true, metrics: { events, rate: rate(events, ms), producerRate: rate(events, producedMs), queriesPerEvent } };
}

async function fanout(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const counter = new Counter();
  const bus = newBus(task);
  const names = Array.from({ length: task.fanout }, (_, i) => `fan${i}`);
  for (const name of names) bus.subscribe(name, Ev, handlerFor(task, counter), subscribeOptions(task, 'now'));
  await bus.start();
  const acked = await acknowledged(task, names);
  const deliveries = task.events * task.fanout;
  const q0 = queriesSoFar();
  const t0 = now();
  await produce(task.events, PRODUCERS, async (seq) => {
    const event = makeEvent(seq, task.variant.keys);
    await bus.transaction(async (tx) => bus.publish(Ev, event, { tx }));
  });
  const producedMs = now() - t0;
  await counter.until(deliveries, task.timeoutMs);
  await pollUntil(async () => (await acked()) >= deliveries, 30_000, 'all acknowledged');
  const ms = now() - t0;
  await bus.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return { ok: true, metrics: { rate: rate(deliveries, ms), producerRate: rate(task.events, producedMs), queriesPerEvent } };
}

async function latency(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const counter = new Counter();
  const probe = { fn: (_seq: number) => undefined as void };
  const bus = newBus(task);
  bus.subscribe('latency', Ev, handlerFor(task, counter, probe), subscribeOptions(task, 'now'));
  await bus.start();
  const { metrics, series } = await latencyPhases(
    task,
    ['postgres'],
    (seq) => bus.publish(Ev, makeEvent(seq, task.variant.keys)),
    (fn) => {
      probe.fn = fn;
    },
  );
  Object.assign(metrics, await idlePg(task));
  await bus.stop();
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
