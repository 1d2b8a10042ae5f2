/**
 * The fairness workload's publishers, in a process of their own (bench/tidings/fairness.ts forks this file),
 * as the tenants' services run: the quiet tenants' open loop (one `bus.publish` per event) and, in the
 * noisy rows, the noisy tenant's flood (a `publishMany` every 20 ms). Beside the subscription, their calls
 * would wait for the consumer's process, saturated by the noisy backlog whatever the delivery order, and
 * measure that process rather than fair delivery. Times are on the machine's monotonic clock, shared with the
 * measuring process. Protocol over IPC: `ready` once the bus is open; on `go`, publishes and answers
 * `PublishersReport`.
 *
 * Usage (by fairness.ts): node --import tsx bench/tidings/fairness-publishers.ts <task json> <schema>
 */
import { openLoop, type Sent } from '../load/latency.ts';
import { now, rate, sleep } from '../load/measure.ts';
import type { FairnessSizes, Task } from '../protocol.ts';
import { tidings } from './build.ts';
import { IsolatedEvent, NOISY, noisyEvents, PAYLOAD, TenantEvent } from './fairness-events.ts';

const { createBus } = await tidings<typeof import('../../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../../src/postgres/index.ts')>('postgres/index');

export interface PublishersReport {
  quiet: Sent;
  /** [seq, publish call returned (ms, monotonic)] of the quiet events. */
  committedAt: Array<[number, number]>;
  /** The noisy tenant's events/s achieved (0: no noisy tenant). */
  noisyRate: number;
}

/** Keys of each quiet tenant (a customer's few orders in flight). */
const QUIET_KEYS = 5;
/** The noisy tenant's publishes: one `publishMany` per tick. */
const TICK_MS = 20;

const task = JSON.parse(process.argv[2]!) as Task;
const schema = process.argv[3]!;
const sizes = task.fairness as FairnessSizes;
const bus = createBus({ service: 'bench-publishers', backbone: postgres({ url: task.pgUrl, schema }) });
await bus.transaction(async () => undefined); // opens the pool before the clock starts
process.once('message', () => {
  publish().then(
    async (report) => {
      await bus.stop();
      process.send?.(report, () => process.exit(0));
    },
    (error: unknown) => {
      console.error(error);
      process.exit(1);
    },
  );
});
process.send?.('ready');

async function publish(): Promise<PublishersReport> {
  const committedAt: Array<[number, number]> = [];
  const [quiet, noisyRate] = await Promise.all([
    openLoop(sizes.quietRate * sizes.quietTenants, sizes.seconds, 0, async (seq) => {
      const tenant = seq % sizes.quietTenants;
      const key = `q${tenant}-${Math.floor(seq / sizes.quietTenants) % QUIET_KEYS}`;
      await bus.publish(TenantEvent, { key, seq, payload: PAYLOAD }, { tenant: `q${tenant}` });
      committedAt.push([seq, now()]);
    }),
    task.variant.noisy === true ? publishNoisy() : Promise.resolve(0),
  ]);
  return { quiet, committedAt, noisyRate };
}

/** The noisy tenant at `noisyRate`: a `publishMany` every tick, open loop (late ticks do not slow it). Returns the rate achieved. */
async function publishNoisy(): Promise<number> {
  const perTick = Math.round((sizes.noisyRate * TICK_MS) / 1_000);
  const ticks = Math.round((sizes.seconds * 1_000) / TICK_MS);
  const begin = now();
  const inFlight: Promise<unknown>[] = [];
  const contract = task.variant.isolated === true ? IsolatedEvent : TenantEvent;
  for (let tick = 0; tick < ticks; tick++) {
    await sleep(begin + tick * TICK_MS - now());
    inFlight.push(bus.publishMany(contract, noisyEvents(sizes.backlog + tick * perTick, perTick), { tenant: NOISY }));
  }
  await Promise.all(inFlight);
  return rate(ticks * perTick, now() - begin);
}
