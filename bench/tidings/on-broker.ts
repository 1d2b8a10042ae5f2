/**
 * Tidings on a broker backbone (RabbitMQ or NATS JetStream), workloads 2, 3 and 5: the body shared by
 * bench/tidings/rabbitmq.ts and bench/tidings/nats.ts, which say how to make the backbone and clean up.
 *
 * - drain: a backlog published with `publishMany` (1,000 per call), then a subscription started; timed from
 *   `bus.start()` (connection already open) to the last handler finished, and from the first message on. The
 *   steady rows first run a drain of `warmUpEvents` in the same process (`warmedUp`), unmeasured.
 * - e2e: 10 producers, one event per call. Standalone: `bus.publish` (resolves on the broker's confirm).
 *   With `variant.outbox`: `bus.transaction` + `publish({ tx })` into the PostgreSQL outbox, the relay in
 *   this process hands it to the broker, the handler runs in a transaction with its inbox record.
 * - latency: open loop at the task's rate, `bus.publish` -> handler start.
 * - request (issue 21): `bus.request` at the task's rate; the replier is another process (load/helper.ts), its
 *   replies travel through the PostgreSQL outbox database, as they do for users on the brokers.
 *
 * Throughput counts handlers finished, whose acknowledgement is sent right after (brokers do not confirm
 * acks). After `bus.stop()` the queues / consumers are checked: nothing may be left unacknowledged.
 */
import { z } from 'zod';
import type { Bus, Message } from '../../src/index.ts';
import type { BrokerBackbone } from '../../src/outbox/index.ts';
import type { PgTransaction, PostgresBackbone } from '../../src/postgres/index.ts';
import { CHUNK, CONCURRENCY, drainMetrics, Handled, PARTITIONS, PRODUCERS } from '../load/brokers.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { type Helper, startHelper } from '../load/helper.ts';
import { latencyPhases } from '../load/latency.ts';
import { now, produce, rate, warmedUp } from '../load/measure.ts';
import { monitorClient } from '../load/pg.ts';
import { roundTrips } from '../load/round-trip.ts';
import { tidings } from './build.ts';
import type { ChildResult, Task } from '../protocol.ts';

const { createBus, defineCommand, defineEvent } = await tidings<typeof import('../../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../../src/postgres/index.ts')>('postgres/index');

/** The outbox schema of the outbox rows; one benchmark runs at a time (the parent's lock). */
const OUTBOX_SCHEMA = 'tidings_bench_outbox';

export const Ev = defineEvent('bench.event', {
  schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }),
  key: (e) => e.key,
});

/** The request row's command; its name also names what the row leaves on the broker. */
export const ASK = 'bench.ask';
const Ask = defineCommand(ASK, {
  schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }),
  reply: z.object({ seq: z.number() }),
  key: (e) => e.key,
});

export interface BrokerUnderTest {
  /** Server process names for the CPU figure. */
  readonly processes: readonly string[];
  /** RabbitMQ keeps no log: a subscription's queues must exist before the backlog is published. */
  readonly declareBeforeBacklog: boolean;
  backbone(outbox: PostgresBackbone | undefined): BrokerBackbone;
  /** Messages still unacknowledged by the subscriptions once their buses stopped (0 expected). */
  unacked(subscriptions: readonly string[]): Promise<number>;
  /** Removes everything this task made on the broker. */
  cleanup(subscriptions: readonly string[]): Promise<void>;
}

type TBus = Bus<PgTransaction>;

function warn(message: string, error?: unknown): void {
  process.stderr.write(`[tidings] ${message}${error instanceof Error ? `: ${error.message}` : ''}\n`);
}

function options(startFrom: 'now' | 'beginning') {
  return { concurrency: CONCURRENCY, partitions: PARTITIONS, batchSize: 500, startFrom };
}

async function dropOutbox(task: Task): Promise<void> {
  const client = await monitorClient(task.pgUrl);
  try {
    await client.query(`drop schema if exists ${OUTBOX_SCHEMA} cascade`);
  } finally {
    await client.end();
  }
}

export function tidingsOnBroker(broker: BrokerUnderTest) {
  const newBus = (task: Task, service = 'bench'): TBus => {
    const outbox = task.variant.outbox === true ? postgres({ url: task.pgUrl, schema: OUTBOX_SCHEMA, onWarning: warn }) : undefined;
    return createBus({ service, backbone: broker.backbone(outbox) }) as TBus;
  };
  const counting = (handled: Handled, probe?: { fn: (seq: number) => void }) => async (message: Message<BenchEvent>) => {
    probe?.fn(message.data.seq);
    handled.add(message.data.seq);
  };

  /** Runs `body`, then checks nothing was left unacknowledged, and always cleans up. */
  async function guarded(task: Task, subscriptions: string[], body: () => Promise<ChildResult>): Promise<ChildResult> {
    if (task.variant.outbox === true) await dropOutbox(task);
    try {
      const result = await body();
      const left = await broker.unacked(subscriptions);
      if (left > 0) throw new Error(`${left} message(s) left unacknowledged after the bus stopped`);
      return result;
    } finally {
      await broker.cleanup(subscriptions).catch((error: unknown) => warn('cleanup failed', error));
      if (task.variant.outbox === true) await dropOutbox(task).catch(() => undefined);
    }
  }

  async function drain(task: Task): Promise<ChildResult> {
    return guarded(task, ['drain'], async () => {
      if (broker.declareBeforeBacklog) {
        const declare = newBus(task);
        declare.subscribe('drain', Ev, async () => undefined, options('beginning'));
        await declare.start();
        await declare.stop();
      }
      const publisher = newBus(task);
      for (let first = 0; first < task.events; first += CHUNK) {
        const chunk = Array.from({ length: Math.min(CHUNK, task.events - first) }, (_, i) => makeEvent(first + i, task.variant.keys));
        await publisher.publishMany(Ev, chunk);
      }
      await publisher.stop();
      const handled = new Handled();
      let firstMessageAt = 0;
      const bus = newBus(task);
      bus.subscribe('drain', Ev, counting(handled, { fn: () => (firstMessageAt ||= now()) }), options('beginning'));
      await bus.backbone.open();
      const t0 = now();
      await bus.start();
      await handled.until(task.events, task.timeoutMs);
      const end = now();
      await bus.stop();
      return { ok: true, metrics: drainMetrics(task.events, t0, firstMessageAt, end, handled) };
    });
  }

  async function endToEnd(task: Task): Promise<ChildResult> {
    return guarded(task, ['e2e'], async () => {
      const handled = new Handled();
      const bus = newBus(task);
      bus.subscribe('e2e', Ev, counting(handled), options('now'));
      await bus.start();
      const t0 = now();
      await produce(task.events, PRODUCERS, async (seq) => {
        const event = makeEvent(seq, task.variant.keys);
        if (task.variant.outbox === true) await bus.transaction(async (tx) => bus.publish(Ev, event, { tx }));
        else await bus.publish(Ev, event);
      });
      const producedMs = now() - t0;
      await handled.until(task.events, task.timeoutMs);
      const ms = now() - t0;
      await bus.stop();
      return { ok: true, metrics: { rate: rate(task.events, ms), producerRate: rate(task.events, producedMs), duplicates: handled.duplicates } };
    });
  }

  async function latency(task: Task): Promise<ChildResult> {
    return guarded(task, ['latency'], async () => {
      const handled = new Handled();
      const probe = { fn: (_seq: number) => undefined as void };
      const bus = newBus(task);
      bus.subscribe('latency', Ev, counting(handled, probe), options('now'));
      await bus.start();
      const { metrics, series } = await latencyPhases(
        task,
        broker.processes,
        (seq) => bus.publish(Ev, makeEvent(seq, task.variant.keys)),
        (fn) => {
          probe.fn = fn;
        },
      );
      await bus.stop();
      metrics.duplicates = handled.duplicates;
      return { ok: true, metrics, series };
    });
  }

  /** The helper process of the request row: another service, owner of the command, whose handler replies. */
  async function replier(task: Task): Promise<() => Promise<void>> {
    const bus = newBus(task, 'bench-replier');
    bus.subscribe('ask', Ask, async (message) => ({ seq: message.data.seq }), options('now'));
    await bus.start();
    return () => bus.stop();
  }

  async function request(task: Task): Promise<ChildResult> {
    return guarded(task, ['ask'], async () => {
      const bus = newBus(task);
      await bus.start();
      let helper: Helper | undefined;
      try {
        helper = await startHelper(task);
        return await roundTrips(task, broker.processes, helper.pid, (seq) => bus.request(Ask, makeEvent(seq, task.variant.keys), { timeoutMs: 30_000 }));
      } finally {
        await helper?.stop();
        await bus.stop();
      }
    });
  }

  return { drain: warmedUp(drain), e2e: endToEnd, latency, request, helper: replier };
}
