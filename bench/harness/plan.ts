/** What runs, in which order, with which sizes. */
import type { ReplicaSizes, Task, Variant, Workload } from '../protocol.ts';
import { brokerSteps, brokerTask, isBrokerRow } from './brokers.ts';
import type { Row, Step } from './rows.ts';

export interface Sizes {
  rounds: number;
  bulk: number;
  drain: number;
  /** Workloads 3 and 4 (but the producers-only row, sized like the raw floor): seconds of publishing measured. */
  publishSeconds: number;
  fanoutEvents: number;
  fanout: number;
  latencySeconds: number;
  baseRates: number[];
  guaranteeRates: number[];
  idleSeconds: number;
  raw: number;
  timeoutMs: number;
  replica: ReplicaSizes;
}

export const FULL: Sizes = {
  rounds: 3,
  bulk: 20_000,
  drain: 20_000,
  publishSeconds: 3,
  fanoutEvents: 500,
  fanout: 10,
  latencySeconds: 8,
  baseRates: [500, 1_000],
  guaranteeRates: [1_000],
  idleSeconds: 5,
  raw: 20_000,
  timeoutMs: 240_000,
  replica: { logins: 4_000, concurrency: 4, users: 10_000, driftKeys: 100_000, differences: [0, 10, 1_000] },
};

export const QUICK: Sizes = {
  rounds: 1,
  bulk: 5_000,
  drain: 5_000,
  publishSeconds: 0.5,
  fanoutEvents: 100,
  fanout: 10,
  latencySeconds: 2,
  baseRates: [500, 1_000],
  guaranteeRates: [1_000],
  idleSeconds: 2,
  raw: 5_000,
  timeoutMs: 90_000,
  replica: { logins: 400, concurrency: 4, users: 2_000, driftKeys: 10_000, differences: [0, 10, 1_000] },
};

const plain: Variant = { keys: 0, effects: false, inbox: true };
const keyed: Variant = { keys: 1_000, effects: false, inbox: true };
const effects: Variant = { keys: 1_000, effects: true, inbox: true };
const noInbox: Variant = { keys: 1_000, effects: false, inbox: false };

export const LABELS = {
  tidings: 'Tidings',
  pgboss: 'pg-boss',
  graphile: 'graphile-worker',
  bullmq: 'BullMQ',
};

const base: Row[] = [
  { system: 'tidings', label: LABELS.tidings, variant: plain, group: 'base', reference: true },
  { system: 'pgboss', label: LABELS.pgboss, variant: plain, group: 'base' },
  { system: 'graphile', label: LABELS.graphile, variant: plain, group: 'base' },
  { system: 'bullmq', label: LABELS.bullmq, variant: plain, group: 'base' },
];
const tidingsKeyed: Row = { system: 'tidings', label: 'Tidings, 1k keys, inbox, no-op', variant: keyed, group: 'guarantees' };
const tidingsEffects: Row = {
  system: 'tidings',
  label: 'Tidings, 1k keys, inbox, insert via ctx.tx',
  variant: effects,
  group: 'guarantees',
  reference: true,
};
/** T5: the producers' commit rate with no consumer taking CPU from them, beside the raw single-row commits. */
const tidingsProducers: Row = {
  system: 'tidings',
  label: 'Tidings, producers only (no consumer; as many events as raw 10-conn commits)',
  variant: { ...plain, producersOnly: true },
  group: 'guarantees',
};
const tidingsNoInbox: Row = { system: 'tidings', label: 'Tidings, 1k keys, inbox off, no-op', variant: noInbox, group: 'guarantees' };
const peersEffects: Row[] = [
  { system: 'pgboss', label: 'pg-boss, insert (own connection)', variant: effects, group: 'guarantees' },
  { system: 'graphile', label: 'graphile-worker, insert (own connection)', variant: effects, group: 'guarantees' },
  { system: 'bullmq', label: 'BullMQ, insert into PostgreSQL', variant: effects, group: 'guarantees' },
];

/** Workload 9: Tidings replicas (issue 6), no peers; bench/tidings/replica.ts. */
const replicaRow: Row = { system: 'replica', label: 'Tidings replica', variant: plain, group: 'replica', reference: true };

/** The workloads in order; in each round every step runs its rows one after another (A B C, A B C ...). */
export function steps(quick: boolean): Step[] {
  const guarantees = quick ? [tidingsKeyed, tidingsEffects] : [tidingsKeyed, tidingsEffects, ...peersEffects];
  return [
    { workload: 'raw', rows: [{ system: 'raw', label: 'PostgreSQL (pg)', variant: plain, group: 'raw' }] },
    { workload: 'bulk', rows: base },
    { workload: 'drain', rows: [...base, ...guarantees, ...(quick ? [] : [tidingsNoInbox])] },
    { workload: 'e2e', rows: [...base, tidingsKeyed, tidingsEffects, tidingsProducers] },
    { workload: 'standalone', rows: base },
    { workload: 'fanout', rows: base },
    { workload: 'latency', rows: [...base, tidingsKeyed, tidingsEffects] },
    { workload: 'login', rows: [replicaRow] },
    { workload: 'drift', rows: [replicaRow] },
    ...brokerSteps(),
  ];
}

/** Commits of the raw floor's single-row rows (bench/baselines/raw.ts). */
export function rawSingleRowCommits(rawEvents: number): number {
  return Math.round(rawEvents / 2);
}

export function taskFor(row: Row, workload: Workload, sizes: Sizes, db: { url: string; name: string }, quick: boolean): Task {
  const events: Record<Workload, number> = {
    raw: sizes.raw,
    bulk: sizes.bulk,
    drain: sizes.drain,
    // The other rows of workloads 3 and 4 publish for `publishSeconds`. T5 compares this one with the raw
    // 10-connection single-row commits: the same number of commits.
    e2e: row.variant.producersOnly === true ? rawSingleRowCommits(sizes.raw) : 0,
    standalone: 0,
    fanout: sizes.fanoutEvents,
    latency: 0,
    login: sizes.replica.logins,
    drift: sizes.replica.driftKeys,
  };
  const task: Task = {
    system: row.system,
    label: row.label,
    workload,
    variant: row.variant,
    events: events[workload],
    publishSeconds: (workload === 'e2e' || workload === 'standalone') && row.variant.producersOnly !== true ? sizes.publishSeconds : 0,
    fanout: sizes.fanout,
    rates: row.group === 'base' ? sizes.baseRates : sizes.guaranteeRates,
    latencySeconds: sizes.latencySeconds,
    idleSeconds: row.group === 'base' ? sizes.idleSeconds : 0,
    pgUrl: db.url,
    database: db.name,
    redis: { host: '127.0.0.1', port: 6379 },
    quick,
    timeoutMs: sizes.timeoutMs,
    replica: sizes.replica,
  };
  return isBrokerRow(row) ? brokerTask(task, quick) : task;
}

export const WORKLOAD_TITLES: Record<Workload, string> = {
  raw: 'Raw PostgreSQL floor',
  bulk: '1. Bulk publish (1,000 per call, one transaction each)',
  drain: '2. Drain a stored backlog (until acknowledged)',
  e2e: '3. End to end, 10 producers, one event per transaction',
  standalone: '4. Standalone publish end to end, 10 concurrent callers',
  fanout: '7. Fan-out: one event to 10 subscriptions, 10 producers (deliveries/s)',
  latency: '5. Latency, open-loop producer: publish call -> handler start',
  login: '9a. Login from a local replica (memory) vs a synchronous HTTP call to identity',
  drift: '9b. Drift check of a replica against its source over the bus',
};
