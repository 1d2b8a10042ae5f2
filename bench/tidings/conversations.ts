/**
 * Issue 21's rows for Tidings on PostgreSQL: scheduled delivery, request/reply, sagas. Imported by
 * bench/tidings/postgres.ts (the child of the `tidings` system).
 *
 * - scheduled: `publishMany(..., { deliverAt })` per 10 ms slot (one due time per call), one subscription.
 * - request: `bus.request` at a fixed rate from this process; the handler that replies runs in a helper
 *   process (another service), its reply written in its transaction and read by the asker on a signal.
 * - saga: a backlog of 3 messages per saga (started, advanced, finished; one key per saga, so they arrive in
 *   order), then the saga starts draining it: transitions/s until every instance completed.
 */
import { z } from 'zod';
import { makeEvent } from '../load/events.ts';
import { type Helper, startHelper } from '../load/helper.ts';
import { now, pollUntil, rate } from '../load/measure.ts';
import { freshSchema, monitorClient } from '../load/pg.ts';
import { roundTrips } from '../load/round-trip.ts';
import { Schedule } from '../load/scheduled.ts';
import type { ChildResult, Task } from '../protocol.ts';
import { tidings } from './build.ts';
import { newBus, SCHEMA } from './pg-bus.ts';

const { defineEvent, defineCommand, defineSaga } = await tidings<typeof import('../../src/index.ts')>('index');
const event = z.object({ key: z.string(), seq: z.number(), payload: z.string() });
const Due = defineEvent('bench.due', { schema: event, key: (e) => e.key });
const Ask = defineCommand('bench.ask', { schema: event, reply: z.object({ seq: z.number() }), key: (e) => e.key });

const SagaMessage = z.object({ id: z.string() });
const Started = defineEvent('bench.saga-started', { schema: SagaMessage, key: (m) => m.id });
const Advanced = defineEvent('bench.saga-advanced', { schema: SagaMessage, key: (m) => m.id });
const Finished = defineEvent('bench.saga-finished', { schema: SagaMessage, key: (m) => m.id });
const ThreeSteps = defineSaga({
  name: 'bench.three-steps',
  state: z.object({ id: z.string(), step: z.number().int() }),
  messages: { started: Started, advanced: Advanced, finished: Finished },
  correlate: { started: (m) => m.id, advanced: (m) => m.id, finished: (m) => m.id },
  start: { started: (message) => ({ id: message.data.id, step: 1 }) },
  handle: {
    advanced: (state) => ({ ...state, step: 2 }),
    finished: (state, _message, ctx) => {
      ctx.complete();
      return { ...state, step: 3 };
    },
  },
});

const options = { concurrency: 8, partitions: 4, batchSize: 500 };

export async function scheduled(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const bus = newBus(task);
  const schedule = new Schedule(task);
  bus.subscribe('due', Due, async (message) => schedule.started(message.data.seq), { ...options, inbox: true, startFrom: 'now' });
  await bus.start();
  await schedule.scheduleAll(1_000, true, (seqs) =>
    bus.publishMany(
      Due,
      seqs.map((seq) => makeEvent(seq, task.variant.keys)),
      { deliverAt: new Date(schedule.dueOf(seqs[0]!)) },
    ),
  );
  const result = await schedule.done();
  await bus.stop();
  return result;
}

/** The helper process of the request rows: another service whose handler replies. */
export async function replier(task: Task): Promise<() => Promise<void>> {
  const bus = newBus(task, 'bench-replier');
  bus.subscribe('ask', Ask, async (message) => ({ seq: message.data.seq }), { ...options, inbox: true });
  await bus.start();
  return () => bus.stop();
}

export async function request(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const bus = newBus(task);
  await bus.start();
  let helper: Helper | undefined;
  try {
    helper = await startHelper(task);
    return await roundTrips(task, ['postgres'], helper.pid, (seq) => bus.request(Ask, makeEvent(seq, task.variant.keys), { timeoutMs: 30_000 }));
  } finally {
    await helper?.stop();
    await bus.stop();
  }
}

export async function saga(task: Task): Promise<ChildResult> {
  await freshSchema(task, SCHEMA);
  const sagas = task.events;
  const ids = Array.from({ length: sagas }, (_, i) => ({ id: `s${i}` }));
  const publisher = newBus(task);
  await publisher.transaction(async () => undefined); // opens and migrates
  for (const contract of [Started, Advanced, Finished]) {
    for (let first = 0; first < sagas; first += 1_000) await publisher.publishMany(contract, ids.slice(first, first + 1_000));
  }
  await publisher.stop();
  const monitor = await monitorClient(task.pgUrl);
  const completed = async () =>
    Number((await monitor.query<{ n: string }>(`select count(*) as n from ${SCHEMA}.sagas where completed_at is not null`)).rows[0]?.n ?? 0);
  const bus = newBus(task);
  bus.saga(ThreeSteps, { ...options, startFrom: 'beginning' });
  await bus.transaction(async () => undefined);
  const t0 = now();
  await bus.start();
  await pollUntil(async () => (await completed()) >= sagas, task.timeoutMs, 'every saga completed', 20);
  const ms = now() - t0;
  // Transitions run (a batch rolled back and run again counts twice) beside the 3 per saga that committed.
  const attempts = bus.stats().sagas[ThreeSteps.name]?.transitions ?? 0;
  await bus.stop();
  await monitor.end();
  return { ok: true, metrics: { sagas, transitionRate: rate(3 * sagas, ms), sagaRate: rate(sagas, ms), transitionsRun: attempts } };
}
