/**
 * The broker rows (issue 5, issue 8 workload 8): Tidings on RabbitMQ and on NATS JetStream beside a plain
 * amqplib / nats.js client doing the same, in workloads 2 (drain), 3 (e2e) and 5 (latency), with their own
 * sizes (brokers confirm more slowly than PostgreSQL commits; the full run must stay under 20 minutes).
 * Children: bench/tidings/rabbitmq.ts and nats.ts, bench/peers/amqp.ts and natsjs.ts.
 */
import type { Task, Variant } from '../protocol.ts';
import type { Row, Step } from './rows.ts';

export type BrokerGroup = 'rabbitmq' | 'nats';

export interface BrokerSizes {
  drain: number;
  e2e: number;
  rate: number;
  latencySeconds: number;
  timeoutMs: number;
}

export const BROKER_FULL: BrokerSizes = { drain: 10_000, e2e: 1_500, rate: 500, latencySeconds: 4, timeoutMs: 120_000 };
export const BROKER_QUICK: BrokerSizes = { drain: 1_000, e2e: 200, rate: 500, latencySeconds: 1, timeoutMs: 60_000 };

const plain: Variant = { keys: 0, effects: false, inbox: true };
const outbox: Variant = { ...plain, outbox: true };

/** Labels, also read by the T9 check (bench/harness/targets.ts). */
export const BROKERS = [
  {
    group: 'rabbitmq',
    name: 'RabbitMQ',
    client: 'amqplib',
    tidings: 'Tidings on RabbitMQ',
    outbox: 'Tidings on RabbitMQ, PostgreSQL outbox + relay',
    plain: 'amqplib (plain client)',
    systems: ['rabbitmq', 'amqp'],
  },
  {
    group: 'nats',
    name: 'NATS',
    client: 'nats.js',
    tidings: 'Tidings on NATS',
    outbox: 'Tidings on NATS, PostgreSQL outbox + relay',
    plain: 'nats.js (plain client)',
    systems: ['nats', 'natsjs'],
  },
] as const;

export const BROKER_TITLES: Record<BrokerGroup, string> = {
  rabbitmq: ' -- RabbitMQ (Tidings and the plain client: one publish per event, awaiting its confirm; outbox row: one PostgreSQL transaction per event)',
  nats: ' -- NATS JetStream (Tidings and the plain client: one publish per event, awaiting its ack; outbox row: one PostgreSQL transaction per event)',
};

export function brokerSteps(): Step[] {
  const rows = BROKERS.map((b) => ({
    tidings: { system: b.systems[0], label: b.tidings, variant: plain, group: b.group, reference: true } satisfies Row,
    outbox: { system: b.systems[0], label: b.outbox, variant: outbox, group: b.group } satisfies Row,
    plain: { system: b.systems[1], label: b.plain, variant: plain, group: b.group } satisfies Row,
  }));
  return [
    { workload: 'drain', rows: rows.flatMap((r) => [r.tidings, r.plain]) },
    { workload: 'e2e', rows: rows.flatMap((r) => [r.tidings, r.outbox, r.plain]) },
    { workload: 'latency', rows: rows.flatMap((r) => [r.tidings, r.plain]) },
  ];
}

export function isBrokerRow(row: Row): boolean {
  return row.group === 'rabbitmq' || row.group === 'nats';
}

/** The broker rows' own sizes over the task the PostgreSQL rows would get. */
export function brokerTask(task: Task, quick: boolean): Task {
  const sizes = quick ? BROKER_QUICK : BROKER_FULL;
  const events = task.workload === 'drain' ? sizes.drain : task.workload === 'e2e' ? sizes.e2e : 0;
  return { ...task, events, publishSeconds: 0, rates: [sizes.rate], latencySeconds: sizes.latencySeconds, idleSeconds: 0, timeoutMs: sizes.timeoutMs };
}
