/** Tidings on its PostgreSQL backbone. One process per task (two in the two-process rows); a fresh schema each time. */
import { z } from 'zod';
import type { Bus, HandlerContext, Message } from '../../src/index.ts';
import type { PgTransaction } from '../../src/postgres/index.ts';
import { runChild } from '../load/child.ts';
import { type BenchEvent, makeEvent } from '../load/events.ts';
import { Counter, now, pollUntil, produce, rate, warmedUp } from '../load/measure.ts';
import { BUSINESS_INSERT, BUSINESS_NOTE, freshSchema, idlePg, monitorClient, queriesSoFar } from '../load/pg.ts';
import { endToEnd, latency, type Probe, PRODUCERS, type Sides } from '../load/sides.ts';
import type { ChildResult, Task } from '../protocol.ts';
import { tidings } from './build.ts';
import { replier, request, saga, scheduled } from './conversations.ts';
import { fillLog } from './fill-log.ts';
import { fairness } from './fairness.ts';
import { grantEffects, newBus, SCHEMA, tenantOf } from './pg-bus.ts';

const { defineEvent, keyHash } = await tidings<typeof import('../../src/index.ts')>('index');
const CHUNK = 1_000;

const Ev = defineEvent('bench.event', {
  schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }),
  key: (e) => e.key,
});

type Tx = PgTransaction;
type Handler = (message: Message<BenchEvent>, ctx: HandlerContext<Tx>) => Promise<void>;

const event = (task: Task, seq: number) => makeEvent(seq, task.variant.keys, task.variant.payloadBytes);

/** The handler of the task's variant: a no-op, or one insert through the message's transaction. */
function handlerFor(task: Task, probe: Probe): Handler {
  if (task.variant.effects) {
    return async (message, ctx) => {
      probe.start(message.data.seq);
      await ctx.tx.query('insert into bench_effects (id) values ($1)', [message.id]);
      probe.end();
    };
  }
  return async (message) => {
    probe.start(message.data.seq);
    probe.end();
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

/**
 * How the task's producers publish: workload 3 one event per `bus.transaction` (with the business row when
 * the variant has one), workloads 4 and 5 a plain `bus.publish`.
 */
function publisherOf(task: Task, bus: Bus<Tx>): (seq: number) => Promise<unknown> {
  if (task.workload !== 'e2e') return (seq) => bus.publish(Ev, event(task, seq), tenantOf(task, seq));
  if (task.variant.businessRow === true) {
    return (seq) =>
      bus.transaction(async (tx) => {
        await tx.query(BUSINESS_INSERT, [seq, BUSINESS_NOTE]);
        await bus.publish(Ev, event(task, seq), { tx, ...tenantOf(task, seq) });
      });
  }
  return (seq) => bus.transaction(async (tx) => bus.publish(Ev, event(task, seq), { tx, ...tenantOf(task, seq) }));
}

const sides: Sides = {
  servers: ['postgres'],
  prepare: async (task) => {
    await freshSchema(task, SCHEMA);
    if (task.variant.rls === true && task.variant.effects) await grantEffects(task);
  },
  async consumer(task, probe) {
    const bus = newBus(task);
    const names = Array.from({ length: task.variant.subscriptions ?? 1 }, (_, i) => `e2e${i}`);
    for (const name of names) bus.subscribe(name, Ev, handlerFor(task, probe), subscribeOptions(task, 'now'));
    await bus.start();
    const acked = await acknowledged(task, names);
    return {
      acknowledged: async (n) => (await acked()) >= n * names.length,
      local: { publish: publisherOf(task, bus), stop: async () => undefined },
      stop: () => bus.stop(),
    };
  },
  async publisher(task) {
    const bus = newBus(task);
    await bus.transaction(async () => undefined); // opens (and, with no consumer, migrates)
    return { publish: publisherOf(task, bus), stop: () => bus.stop() };
  },
  idle: idlePg,
};

async function publishBacklog(task: Task, total: number): Promise<void> {
  const bus = newBus(task);
  await bus.transaction(async () => undefined); // opens and migrates
  for (let first = 0; first < total; first += CHUNK) {
    const chunk = Array.from({ length: Math.min(CHUNK, total - first) }, (_, i) => event(task, first + i));
    // One tenant per call (a publishMany carries one): the chunks take the tenants in turn.
    await bus.publishMany(Ev, chunk, tenantOf(task, first / CHUNK));
  }
  await bus.stop();
}

/**
 * The scaling rows' backlog (up to 1,000,000): the same rows written by PostgreSQL itself, 1,000 per
 * transaction (tidings/fill-log.ts), so that filling it stays well within the watchdog; what is measured
 * is the consumer started after it.
 */
async function fillBacklog(task: Task, total: number): Promise<void> {
  if (task.variant.keys <= 0 || task.variant.tenants !== undefined) throw new Error('the backlog rows fill the log with keyed events and no tenants');
  const bus = newBus(task);
  await bus.transaction(async () => undefined); // opens and migrates
  await bus.stop();
  const client = await monitorClient(task.pgUrl);
  try {
    const keyHashes = Array.from({ length: task.variant.keys }, (_, k) => keyHash(`k${k}`));
    await fillLog(client, { schema: SCHEMA, events: total, keyHashes, payloadBytes: task.variant.payloadBytes });
  } finally {
    await client.end();
  }
}

async function bulk(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const bus = newBus(task);
  await bus.transaction(async () => undefined);
  const chunks = Math.ceil(task.events / CHUNK);
  const data = Array.from({ length: chunks }, (_, c) => Array.from({ length: Math.min(CHUNK, task.events - c * CHUNK) }, (_, i) => event(task, c * CHUNK + i)));
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

/**
 * Drain a stored backlog with one subscription from the beginning: timed from `bus.start()` to the last
 * acknowledgement; also the time to the first message and the rate from it on (steady).
 */
async function drain(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const fillStart = now();
  await (task.workload === 'backlog' ? fillBacklog : publishBacklog)(task, task.events);
  const fillMs = now() - fillStart;
  const counter = new Counter();
  let first = 0;
  const bus = newBus(task);
  await bus.transaction(async () => undefined);
  bus.subscribe(
    'drain',
    Ev,
    handlerFor(task, {
      start: () => {
        if (first === 0) first = now();
      },
      end: () => counter.add(),
    }),
    subscribeOptions(task, 'beginning'),
  );
  const acked = await acknowledged(task, ['drain']);
  const q0 = queriesSoFar();
  const t0 = now();
  await bus.start();
  await counter.until(task.events, task.timeoutMs);
  const handledMs = now() - t0;
  await pollUntil(async () => (await acked()) >= task.events, 30_000, 'all acknowledged');
  const end = now();
  await bus.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return {
    ok: true,
    metrics: {
      rate: rate(task.events, end - t0),
      handlerRate: rate(task.events, handledMs),
      steadyRate: rate(task.events, end - first),
      firstMessageMs: first - t0,
      fillRate: rate(task.events, fillMs),
      queriesPerEvent,
    },
  };
}

async function fanout(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const counter = new Counter();
  const bus = newBus(task);
  const names = Array.from({ length: task.fanout }, (_, i) => `fan${i}`);
  for (const name of names) bus.subscribe(name, Ev, handlerFor(task, { start: () => undefined, end: () => counter.add() }), subscribeOptions(task, 'now'));
  await bus.start();
  const acked = await acknowledged(task, names);
  const deliveries = task.events * task.fanout;
  const q0 = queriesSoFar();
  const t0 = now();
  await produce(task.events, PRODUCERS, (seq) => bus.transaction(async (tx) => bus.publish(Ev, event(task, seq), { tx })));
  const producedMs = now() - t0;
  await counter.until(deliveries, task.timeoutMs);
  await pollUntil(async () => (await acked()) >= deliveries, 30_000, 'all acknowledged');
  const ms = now() - t0;
  await bus.stop();
  const queriesPerEvent = (queriesSoFar() - q0) / task.events;
  return { ok: true, metrics: { rate: rate(deliveries, ms), producerRate: rate(task.events, producedMs), queriesPerEvent } };
}

runChild({
  sides,
  helper: replier,
  scheduled,
  request,
  saga,
  fairness,
  bulk: warmedUp(bulk),
  drain: warmedUp(drain),
  backlog: warmedUp(drain),
  e2e: endToEnd(sides),
  standalone: endToEnd(sides),
  fanout: warmedUp(fanout),
  latency: latency(sides),
});
