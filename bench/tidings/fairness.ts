/**
 * Issue 23's fairness workload: quiet tenants publish at a low rate each (open loop, one `bus.publish` per
 * event), alone, or beside a noisy tenant whose backlog is stored before the subscription starts and who
 * publishes at a high rate meanwhile (a `publishMany` every 20 ms); with the subscription's fairness off
 * (`tenantConcurrency` unset) or on (`tenantConcurrency: 1`: fair reads, so the backlog is read beside the
 * quiet tenants' messages, and fair handler slots; docs/tenancy.md); or with the noisy tenant's events on a
 * topic and subscription of their own in the same process (`isolated`: the machine as loaded, nothing
 * shared: what a queue per tenant would give at best). The publishers run in a process of their own
 * (fairness-publishers.ts), the subscription in this one, as services run. Measured: the quiet tenants'
 * latency, publish call -> handler start, on the machine's monotonic clock (and the publish call alone: how
 * much of it is the publishing side), and from the publish call's return to handler start (delivery alone:
 * what fair delivery controls; the publish call waits for a database the noisy tenant's writes keep busy,
 * which `tenancy.quotas` limits, not delivery); and what the noisy tenant got through.
 */
import { fork } from 'node:child_process';
import { Counter, now, percentile, rate } from '../load/measure.ts';
import { freshSchema } from '../load/pg.ts';
import type { ChildResult, FairnessSizes, Task } from '../protocol.ts';
import { IsolatedEvent, NOISY, noisyEvents, TenantEvent as Ev } from './fairness-events.ts';
import type { PublishersReport } from './fairness-publishers.ts';
import { newBus, SCHEMA } from './pg-bus.ts';

export async function fairness(task: Task): Promise<ChildResult> {
  const sizes = task.fairness as FairnessSizes;
  await freshSchema(task, SCHEMA);
  const bus = newBus(task);
  await bus.transaction(async () => undefined); // opens and migrates
  const isolated = task.variant.isolated === true;
  if (task.variant.noisy === true) {
    for (let first = 0; first < sizes.backlog; first += 1_000)
      await bus.publishMany(isolated ? IsolatedEvent : Ev, noisyEvents(first, Math.min(1_000, sizes.backlog - first)), { tenant: NOISY });
  }
  const started = new Map<number, number>();
  const quiet = new Counter();
  const noisy = new Counter();
  const options = {
    concurrency: 8,
    partitions: 4,
    batchSize: 500,
    startFrom: 'beginning',
    ...(task.variant.fair === true ? { tenantConcurrency: 1 } : {}),
  } as const;
  // The noisy tenant on a subscription of its own: the same load, nothing shared with the quiet tenants.
  if (isolated) bus.subscribe('noisy', IsolatedEvent, async () => noisy.add(), options);
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
    options,
  );
  const publishers = await startPublishers(task);
  const t0 = now();
  await bus.start();
  const { quiet: sent, committedAt, noisyRate } = await publishers.go();
  await quiet.until(sent.sent, task.timeoutMs, 'quiet events handled');
  const elapsed = now() - t0;
  const latencies = sent.sentAt
    .map(([seq, at]) => (started.get(seq) ?? Number.NaN) - at)
    .filter((ms) => Number.isFinite(ms))
    .sort((a, b) => a - b);
  const calledAt = new Map(sent.sentAt);
  const publishes = committedAt.map(([seq, at]) => at - calledAt.get(seq)!).sort((a, b) => a - b);
  // Delivery alone: from the publish call's return (its message committed, visible to a read) to the handler.
  const deliveriesOf = (from: number) =>
    committedAt
      .filter(([, at]) => at >= from)
      .map(([seq, at]) => (started.get(seq) ?? Number.NaN) - at)
      .filter((ms) => Number.isFinite(ms))
      .sort((a, b) => a - b);
  const deliveries = deliveriesOf(Number.NEGATIVE_INFINITY);
  // And from the second second on: past the subscription's start on the noisy backlog (its first reads and
  // batches, a cold process), where the quiet tenants' first messages wait longest.
  const steady = deliveriesOf(Math.min(...committedAt.map(([, at]) => at)) + 1_000);
  const noisyHandled = noisy.count;
  await bus.stop();
  return {
    ok: sent.errors === 0,
    ...(sent.errors === 0 ? {} : { error: `${sent.errors} quiet publishes failed` }),
    metrics: {
      quietP50: percentile(latencies, 50),
      quietP99: percentile(latencies, 99),
      quietMax: latencies.at(-1) ?? Number.NaN,
      quietPublishP99: percentile(publishes, 99),
      quietDeliveryP50: percentile(deliveries, 50),
      quietDeliveryP99: percentile(deliveries, 99),
      quietSteadyDeliveryP99: percentile(steady, 99),
      quietEvents: sent.sent,
      quietAchieved: sent.achievedRate,
      noisyPublished: noisyRate,
      noisyHandled: rate(noisyHandled, elapsed),
      backlog: task.variant.noisy === true ? sizes.backlog : 0,
    },
  };
}

/** Forks the publishers' process (fairness-publishers.ts) and waits till its bus is open; `go` starts them and resolves to their report. */
async function startPublishers(task: Task): Promise<{ go: () => Promise<PublishersReport> }> {
  const child = fork(new URL('./fairness-publishers.ts', import.meta.url), [JSON.stringify(task), SCHEMA], {
    execArgv: process.execArgv,
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  });
  const exited = new Promise<never>((_, reject) => child.once('exit', (code) => reject(new Error(`the publishers' process exited with ${code}`))));
  exited.catch(() => undefined);
  const reply = () => Promise.race([new Promise<unknown>((resolve) => child.once('message', resolve)), exited]);
  await reply();
  return {
    go: async () => {
      const report = reply();
      child.send('go');
      return (await report) as PublishersReport;
    },
  };
}
