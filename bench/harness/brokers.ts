/**
 * The broker rows (issue 5, issue 8 workload 8): Tidings on RabbitMQ and on NATS JetStream beside a plain
 * amqplib / nats.js client doing the same, in workloads 2 (drain: a cold start, and steady after a warm-up,
 * issue 24), 3 (e2e) and 5 (latency), with their own sizes (brokers confirm more slowly than PostgreSQL
 * commits). Children: bench/tidings/rabbitmq.ts and nats.ts, bench/peers/amqp.ts and natsjs.ts.
 */
import type { Task, Variant } from '../protocol.ts';
import type { Row, Step } from './rows.ts';

/** A broker's rows, and its steady drain rows (a table of their own: steady against steady). */
export type BrokerGroup = 'rabbitmq' | 'nats' | 'rabbitmqSteady' | 'natsSteady';

export interface BrokerSizes {
  /** Drain from a fresh process: the subscription's start, and V8 not yet compiled the hot path. */
  drain: number;
  /** Drain after `warmUp` events drained unmeasured in the same process (issue 24: >= 100,000). */
  steady: number;
  warmUp: number;
  e2e: number;
  rate: number;
  latencySeconds: number;
  timeoutMs: number;
}

export const BROKER_FULL: BrokerSizes = { drain: 10_000, steady: 100_000, warmUp: 20_000, e2e: 1_500, rate: 500, latencySeconds: 4, timeoutMs: 120_000 };
export const BROKER_QUICK: BrokerSizes = { drain: 1_000, steady: 2_000, warmUp: 0, e2e: 200, rate: 500, latencySeconds: 1, timeoutMs: 60_000 };
/** The steady rows' watchdog: the warm-up, the 100,000 published and drained (~30 s each on a quiet machine). */
const STEADY_TIMEOUT_MS = 240_000;

const plain: Variant = { keys: 0, effects: false, inbox: true };
const outbox: Variant = { ...plain, outbox: true };

/** Labels, also read by the T9 check (bench/harness/targets.ts). */
export const BROKERS = [
  {
    group: 'rabbitmq',
    steadyGroup: 'rabbitmqSteady',
    name: 'RabbitMQ',
    client: 'amqplib',
    tidings: 'Tidings on RabbitMQ',
    outbox: 'Tidings on RabbitMQ, PostgreSQL outbox + relay',
    plain: 'amqplib (plain client)',
    systems: ['rabbitmq', 'amqp'],
  },
  {
    group: 'nats',
    steadyGroup: 'natsSteady',
    name: 'NATS',
    client: 'nats.js',
    tidings: 'Tidings on NATS',
    outbox: 'Tidings on NATS, PostgreSQL outbox + relay',
    plain: 'nats.js (plain client)',
    systems: ['nats', 'natsjs'],
  },
] as const;

/** The drain rows' labels: `Tidings on RabbitMQ, cold start`, `amqplib (plain client), steady`. */
export const coldLabel = (label: string) => `${label}, cold start`;
export const steadyLabel = (label: string) => `${label}, steady`;

const RABBITMQ_TITLE = 'RabbitMQ (Tidings and the plain client: one publish per event, awaiting its confirm; outbox row: one PostgreSQL transaction per event)';
const NATS_TITLE = 'NATS JetStream (Tidings and the plain client: one publish per event, awaiting its ack; outbox row: one PostgreSQL transaction per event)';
const STEADY_TITLE = 'steady state: after a warm-up drained in the same process; a backlog published, then a fresh subscription started';

export const BROKER_TITLES: Record<BrokerGroup, string> = {
  rabbitmq: ` -- ${RABBITMQ_TITLE}`,
  nats: ` -- ${NATS_TITLE}`,
  rabbitmqSteady: ` -- RabbitMQ, ${STEADY_TITLE}`,
  natsSteady: ` -- NATS JetStream, ${STEADY_TITLE}`,
};

/** The broker of a group of rows, or undefined for a PostgreSQL or Redis group. */
export function brokerOf(group: Row['group']): (typeof BROKERS)[number] | undefined {
  return BROKERS.find((b) => b.group === group || b.steadyGroup === group);
}

export function brokerSteps(): Step[] {
  const rows = BROKERS.map((b) => ({
    tidings: { system: b.systems[0], label: b.tidings, variant: plain, group: b.group, reference: true } satisfies Row,
    outbox: { system: b.systems[0], label: b.outbox, variant: outbox, group: b.group } satisfies Row,
    plain: { system: b.systems[1], label: b.plain, variant: plain, group: b.group } satisfies Row,
  }));
  const drains = BROKERS.flatMap((b): Row[] => [
    { system: b.systems[0], label: coldLabel(b.tidings), variant: plain, group: b.group, reference: true },
    { system: b.systems[1], label: coldLabel(b.plain), variant: plain, group: b.group },
    { system: b.systems[0], label: steadyLabel(b.tidings), variant: plain, group: b.steadyGroup, reference: true },
    { system: b.systems[1], label: steadyLabel(b.plain), variant: plain, group: b.steadyGroup },
  ]);
  return [
    { workload: 'drain', rows: drains },
    { workload: 'e2e', rows: rows.flatMap((r) => [r.tidings, r.outbox, r.plain]) },
    { workload: 'latency', rows: rows.flatMap((r) => [r.tidings, r.plain]) },
  ];
}

export function isBrokerGroup(group: Row['group']): group is BrokerGroup {
  return brokerOf(group) !== undefined;
}

export function isBrokerRow(row: Row): boolean {
  return isBrokerGroup(row.group);
}

/** The broker rows' own sizes over the task the PostgreSQL rows would get. */
export function brokerTask(task: Task, row: Row, quick: boolean): Task {
  const sizes = quick ? BROKER_QUICK : BROKER_FULL;
  const steady = brokerOf(row.group)?.steadyGroup === row.group;
  const events = task.workload === 'drain' ? (steady ? sizes.steady : sizes.drain) : task.workload === 'e2e' ? sizes.e2e : 0;
  return {
    ...task,
    events,
    warmUpEvents: steady ? sizes.warmUp : 0,
    publishSeconds: 0,
    rates: [sizes.rate],
    latencySeconds: sizes.latencySeconds,
    idleSeconds: 0,
    timeoutMs: steady ? STEADY_TIMEOUT_MS : sizes.timeoutMs,
  };
}
