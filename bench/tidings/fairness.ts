/**
 * Issue 23's fairness workload: quiet tenants publish at a low rate each (open loop, one `bus.publish` per
 * event), alone, or beside a noisy tenant whose backlog is stored before the subscription starts and who
 * publishes at a high rate meanwhile (a `publishMany` every 20 ms); with the subscription's fairness off
 * (`tenantConcurrency` unset) or on (`tenantConcurrency: 1`: fair reads, so the backlog is read beside the
 * quiet tenants' messages, and fair handler slots; docs/tenancy.md). Measured: the quiet tenants' latency, publish
 * call -> handler start, on the monotonic clock; and what the noisy tenant got through. One process.
 */
import { z } from 'zod';
import { openLoop } from '../load/latency.ts';
import { Counter, now, percentile, rate, sleep } from '../load/measure.ts';
import { freshSchema } from '../load/pg.ts';
import type { ChildResult, FairnessSizes, Task } from '../protocol.ts';
import { tidings } from './build.ts';
import { newBus, SCHEMA } from './pg-bus.ts';

const { defineEvent } = await tidings<typeof import('../../src/index.ts')>('index');

const Ev = defineEvent('bench.tenant-event', {
  schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }),
  key: (e) => e.key,
});

const NOISY = 'noisy';
const NOISY_KEYS = 1_000;
/** Keys of each quiet tenant (a customer's few orders in flight). */
const QUIET_KEYS = 5;
/** The noisy tenant's publishes: one `publishMany` per tick. */
const TICK_MS = 20;
const PAYLOAD = 'x'.repeat(210);

const noisyEvents = (first: number, n: number) =>
  Array.from({ length: n }, (_, i) => ({ key: `n${(first + i) % NOISY_KEYS}`, seq: first + i, payload: PAYLOAD }));

export async function fairness(task: Task): Promise<ChildResult> {
  const sizes = task.fairness as FairnessSizes;
  await freshSchema(task, SCHEMA);
  const bus = newBus(task);
  await bus.transaction(async () => undefined); // opens and migrates
  if (task.variant.noisy === true) {
    for (let first = 0; first < sizes.backlog; first += 1_000)
      await bus.publishMany(Ev, noisyEvents(first, Math.min(1_000, sizes.backlog - first)), { tenant: NOISY });
  }
  const started = new Map<number, number>();
  const quiet = new Counter();
  const noisy = new Counter();
  bus.subscribe(
    'fair',
    Ev,
    async (message) => {
      if (message.tenant === NOISY) return noisy.add();
      if (!started.has(message.data.seq)) {
        started.set(message.data.seq, now());
        quiet.add();
      }
    },
    {
      concurrency: 8,
      partitions: 4,
      batchSize: 500,
      startFrom: 'beginning',
      ...(task.variant.fair === true ? { tenantConcurrency: 1 } : {}),
    },
  );
  const t0 = now();
  await bus.start();
  const quietRate = sizes.quietRate * sizes.quietTenants;
  const [sent, noisyPublished] = await Promise.all([
    openLoop(quietRate, sizes.seconds, 0, (seq) => {
      const tenant = seq % sizes.quietTenants;
      const key = `q${tenant}-${Math.floor(seq / sizes.quietTenants) % QUIET_KEYS}`;
      return bus.publish(Ev, { key, seq, payload: PAYLOAD }, { tenant: `q${tenant}` });
    }),
    task.variant.noisy === true ? publishNoisy(bus, sizes) : Promise.resolve(0),
  ]);
  await quiet.until(sent.sent, task.timeoutMs, 'quiet events handled');
  const elapsed = now() - t0;
  const latencies = sent.sentAt
    .map(([seq, at]) => (started.get(seq) ?? Number.NaN) - at)
    .filter((ms) => Number.isFinite(ms))
    .sort((a, b) => a - b);
  const noisyHandled = noisy.count;
  await bus.stop();
  return {
    ok: sent.errors === 0,
    ...(sent.errors === 0 ? {} : { error: `${sent.errors} quiet publishes failed` }),
    metrics: {
      quietP50: percentile(latencies, 50),
      quietP99: percentile(latencies, 99),
      quietMax: latencies.at(-1) ?? Number.NaN,
      quietEvents: sent.sent,
      quietAchieved: sent.achievedRate,
      noisyPublished,
      noisyHandled: rate(noisyHandled, elapsed),
      backlog: task.variant.noisy === true ? sizes.backlog : 0,
    },
  };
}

/** The noisy tenant at `noisyRate`: a `publishMany` every tick, open loop (late ticks do not slow it). Returns the rate achieved. */
async function publishNoisy(bus: ReturnType<typeof newBus>, sizes: FairnessSizes): Promise<number> {
  const perTick = Math.round((sizes.noisyRate * TICK_MS) / 1_000);
  const ticks = Math.round((sizes.seconds * 1_000) / TICK_MS);
  const begin = now();
  const inFlight: Promise<unknown>[] = [];
  for (let tick = 0; tick < ticks; tick++) {
    await sleep(begin + tick * TICK_MS - now());
    inFlight.push(bus.publishMany(Ev, noisyEvents(sizes.backlog + tick * perTick, perTick), { tenant: NOISY }));
  }
  await Promise.all(inFlight);
  return rate(ticks * perTick, now() - begin);
}
