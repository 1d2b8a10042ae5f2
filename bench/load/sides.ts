/**
 * Workloads 3, 4 and 5 (end to end, standalone publish, latency) built from a system's two sides, a
 * publisher and a consumer, so that each runs in one process (producers beside the consumer, the way the
 * benchmark always ran) or in two (producers in a process of their own, as two services run: the consumer
 * must then be woken the way another process wakes it). The producers' process is this same file forked with
 * `--producers`; it opens only the publisher and answers the consumer's process over IPC.
 */
import { type ChildProcess, fork } from 'node:child_process';
import type { ChildResult, Task } from '../protocol.ts';
import { type LatencyProducer, latencyPhases, openLoop, type Sent } from './latency.ts';
import { type Amount, Counter, measuredAmount, now, pollUntil, produce, rate, type WorkloadFn, warmUpWith } from './measure.ts';
import { queriesSoFar } from './pg.ts';

/** The flag of the producers' process. */
export const PRODUCERS_FLAG = '--producers';
/** Concurrent producer loops of workloads 3 and 4. */
export const PRODUCERS = 10;

export interface Publisher {
  /** Publishes the event `seq` the way the task's workload says (one transaction each in e2e). */
  publish(seq: number): Promise<unknown>;
  stop(): Promise<void>;
}

/** What a handler reports: it started on `seq` (latency), and it finished (throughput). */
export interface Probe {
  start(seq: number): void;
  end(): void;
}

export interface Consumer {
  /** True once every subscription of the task has acknowledged `n` events. */
  acknowledged(n: number): Promise<boolean>;
  /** A publisher on the consumer's own instance, for producers in its process (Tidings' bus, pg-boss's `notifyWorker`). */
  local?: Publisher;
  stop(): Promise<void>;
}

export interface Sides {
  /** Server processes whose CPU counts in the latency figure. */
  servers: readonly string[];
  /** Removes what an earlier task left; runs in the consumer's process before either side opens. */
  prepare(task: Task): Promise<void>;
  consumer(task: Task, probe: Probe): Promise<Consumer>;
  publisher(task: Task): Promise<Publisher>;
  /** The idle cost with one consumer running (one-process latency rows). */
  idle?(task: Task): Promise<Record<string, number>>;
}

/** Producers as the consumer's process sees them: here, or in the producers' process. */
interface Producers extends LatencyProducer {
  produce(amount: Amount, first: number): Promise<number>;
  stop(): Promise<void>;
}

function localProducers(publisher: Publisher, own: boolean): Producers {
  return {
    produce: (amount, first) => produce(amount, PRODUCERS, (seq) => publisher.publish(first + seq)),
    phase: (r, seconds, first) => openLoop(r, seconds, first, (seq) => publisher.publish(seq)),
    pids: [],
    stop: async () => {
      if (own) await publisher.stop();
    },
  };
}

type Request = { type: 'produce'; amount: Amount; first: number } | { type: 'phase'; rate: number; seconds: number; first: number } | { type: 'stop' };
type Reply = { type: 'ready' } | { type: 'produced'; n: number } | { type: 'sent'; sent: Sent } | { type: 'failed'; error: string };

/** The producers' process: this system's file forked with PRODUCERS_FLAG. */
async function remoteProducers(task: Task): Promise<Producers> {
  const child: ChildProcess = fork(process.argv[1]!, [JSON.stringify(task), PRODUCERS_FLAG], {
    execArgv: process.execArgv,
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  });
  let waiting: { resolve: (reply: Reply) => void; reject: (error: Error) => void } | undefined;
  child.on('message', (reply: Reply) => waiting?.resolve(reply));
  child.on('exit', (code) => waiting?.reject(new Error(`the producers' process exited with ${code}`)));
  const next = () =>
    new Promise<Reply>((resolve, reject) => {
      waiting = { resolve, reject };
    }).then((reply) => {
      if (reply.type === 'failed') throw new Error(`producers' process: ${reply.error}`);
      return reply;
    });
  const ask = (request: Request) => {
    const reply = next();
    child.send(request);
    return reply;
  };
  await next(); // ready
  return {
    pids: child.pid === undefined ? [] : [child.pid],
    produce: async (amount, first) => ((await ask({ type: 'produce', amount, first })) as { n: number }).n,
    phase: async (r, seconds, first) => ((await ask({ type: 'phase', rate: r, seconds, first })) as { sent: Sent }).sent,
    stop: async () => {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.send({ type: 'stop' } satisfies Request);
      await exited;
    },
  };
}

/** The main of the producers' process: opens the publisher, then does what the consumer's process asks. */
export async function runProducers(sides: Sides, task: Task): Promise<void> {
  const send = (reply: Reply) => process.send?.(reply);
  const publisher = await sides.publisher(task);
  process.on('message', (request: Request) => {
    const work = async (): Promise<Reply | undefined> => {
      if (request.type === 'produce') return { type: 'produced', n: await produce(request.amount, PRODUCERS, (seq) => publisher.publish(request.first + seq)) };
      if (request.type === 'phase')
        return { type: 'sent', sent: await openLoop(request.rate, request.seconds, request.first, (seq) => publisher.publish(seq)) };
      await publisher.stop();
      process.exit(0);
    };
    work().then(
      (reply) => reply !== undefined && send(reply),
      (error: unknown) => send({ type: 'failed', error: error instanceof Error ? error.message : String(error) }),
    );
  });
  // The consumer's process ended (or was killed by the watchdog): nothing left to produce for.
  process.on('disconnect', () => process.exit(0));
  send({ type: 'ready' });
}

async function openProducers(task: Task, sides: Sides, consumer: Consumer | undefined): Promise<Producers> {
  if (task.variant.processes === 2) return remoteProducers(task);
  if (consumer?.local !== undefined) return localProducers(consumer.local, false);
  return localProducers(await sides.publisher(task), true);
}

/** Workloads 3 and 4: producers publish (for a time, or a number of events), timed until all are acknowledged. */
export function endToEnd(sides: Sides): WorkloadFn {
  return async (task) => {
    await sides.prepare(task);
    const counter = new Counter();
    const consuming = task.variant.producersOnly !== true;
    const consumer = consuming ? await sides.consumer(task, { start: () => undefined, end: () => counter.add() }) : undefined;
    const producers = await openProducers(task, sides, consumer);
    const subscriptions = task.variant.subscriptions ?? 1;
    const track = consumer === undefined ? undefined : { counter, acknowledged: consumer.acknowledged, subscriptions };
    const warm = await warmUpWith(task, (amount, first) => producers.produce(amount, first), track);
    const q0 = queriesSoFar();
    const t0 = now();
    const events = await producers.produce(measuredAmount(task), 0);
    const producedMs = now() - t0;
    if (consumer !== undefined) {
      await counter.until((warm + events) * subscriptions, task.timeoutMs);
      await pollUntil(() => consumer.acknowledged(warm + events), 60_000, 'all acknowledged');
    }
    const ms = now() - t0;
    const metrics: Record<string, number> = { events, rate: rate(events, ms), producerRate: rate(events, producedMs) };
    if (subscriptions > 1) metrics.deliveryRate = rate(events * subscriptions, ms);
    // Queries are counted in this process only: a two-process row's producers are elsewhere.
    if (task.variant.processes !== 2) metrics.queriesPerEvent = (queriesSoFar() - q0) / events;
    await producers.stop();
    await consumer?.stop();
    return { ok: true, metrics };
  };
}

/** Workload 5: open-loop phases at the task's rates, publish call -> handler start; the idle cost after. */
export function latency(sides: Sides): WorkloadFn {
  return async (task): Promise<ChildResult> => {
    await sides.prepare(task);
    const probe = { fn: (_seq: number) => undefined as void };
    const consumer = await sides.consumer(task, { start: (seq) => probe.fn(seq), end: () => undefined });
    const producers = await openProducers(task, sides, consumer);
    const { metrics, series } = await latencyPhases(task, sides.servers, producers, (fn) => {
      probe.fn = fn;
    });
    if (task.variant.processes !== 2 && sides.idle !== undefined) Object.assign(metrics, await sides.idle(task));
    await producers.stop();
    await consumer.stop();
    return { ok: true, metrics, series };
  };
}
