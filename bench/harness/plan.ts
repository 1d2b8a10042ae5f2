/** What runs, in which order, with which sizes. */
import type { FairnessSizes, ReplicaSizes, Task, Variant, Workload } from '../protocol.ts';
import { brokerSteps, brokerTask, isBrokerRow } from './brokers.ts';
import type { Row, Step } from './rows.ts';

export interface Sizes {
  rounds: number;
  /** Bulk and drain from a fresh process (cold start). */
  bulk: number;
  drain: number;
  /** Bulk and drain after a warm-up of `warmUp` events in the same process (steady state; issue 24: >= 100,000). */
  steady: number;
  warmUp: number;
  /** Workloads 3 and 4 (but the producers-only rows, sized like the raw floor): seconds of publishing measured. */
  publishSeconds: number;
  fanoutEvents: number;
  fanoutWarmUp: number;
  fanout: number;
  latencySeconds: number;
  baseRates: number[];
  guaranteeRates: number[];
  idleSeconds: number;
  raw: number;
  timeoutMs: number;
  replica: ReplicaSizes;
  /** Scaling: drain and time to first message vs backlog, e2e events per run vs subscriptions, payloads. */
  backlogs: number[];
  subscriptionCounts: number[];
  subscriptionEvents: number;
  payloads: number[];
  /**
   * Issue 21: jobs due over `scheduledSeconds` (at the rate of the latency target, and beyond); request/reply
   * rate and seconds; sagas of 3 steps.
   */
  scheduledOnTime: number;
  scheduled: number;
  scheduledSeconds: number;
  requestRate: number;
  requestSeconds: number;
  sagas: number;
  /** Issue 23: the noisy tenant's backlog and rate, the quiet tenants, seconds measured. */
  fairness: FairnessSizes;
}

export const FULL: Sizes = {
  rounds: 2,
  bulk: 20_000,
  drain: 20_000,
  steady: 100_000,
  warmUp: 20_000,
  publishSeconds: 3,
  fanoutEvents: 5_000,
  fanoutWarmUp: 1_000,
  fanout: 10,
  latencySeconds: 6,
  baseRates: [500, 1_000],
  guaranteeRates: [1_000],
  idleSeconds: 5,
  raw: 20_000,
  timeoutMs: 300_000,
  replica: { logins: 4_000, concurrency: 4, users: 10_000, driftKeys: 100_000, differences: [0, 10, 1_000] },
  backlogs: [10_000, 100_000, 1_000_000],
  subscriptionCounts: [1, 4, 16, 64],
  subscriptionEvents: 5_000,
  payloads: [100, 10_000, 100_000],
  scheduledOnTime: 10_000,
  scheduled: 100_000,
  scheduledSeconds: 10,
  requestRate: 1_000,
  requestSeconds: 5,
  sagas: 5_000,
  fairness: { backlog: 20_000, noisyRate: 5_000, quietTenants: 20, quietRate: 10, seconds: 10 },
};

export const QUICK: Sizes = {
  rounds: 1,
  bulk: 5_000,
  drain: 5_000,
  steady: 5_000,
  warmUp: 1_000,
  publishSeconds: 0.5,
  fanoutEvents: 100,
  fanoutWarmUp: 0,
  fanout: 10,
  latencySeconds: 2,
  baseRates: [500, 1_000],
  guaranteeRates: [1_000],
  idleSeconds: 2,
  raw: 5_000,
  timeoutMs: 90_000,
  replica: { logins: 400, concurrency: 4, users: 2_000, driftKeys: 10_000, differences: [0, 10, 1_000] },
  backlogs: [2_000],
  subscriptionCounts: [1, 4],
  subscriptionEvents: 200,
  payloads: [10_000],
  scheduledOnTime: 400,
  scheduled: 2_000,
  scheduledSeconds: 2,
  requestRate: 200,
  requestSeconds: 1,
  sagas: 200,
  fairness: { backlog: 2_000, noisyRate: 5_000, quietTenants: 20, quietRate: 10, seconds: 2 },
};

const plain: Variant = { keys: 0, effects: false, inbox: true };
const keyed: Variant = { keys: 1_000, effects: false, inbox: true };
const effects: Variant = { keys: 1_000, effects: true, inbox: true };
const noInbox: Variant = { keys: 1_000, effects: false, inbox: false };
const two: Variant = { ...plain, processes: 2 };

/** BullMQ's store here keeps nothing on disk: every row of it says so (issue 24). */
export const LABELS = {
  tidings: 'Tidings',
  pgboss: 'pg-boss',
  graphile: 'graphile-worker',
  bullmq: 'BullMQ (Redis, not durable)',
};

const PEERS = [
  ['pgboss', LABELS.pgboss],
  ['graphile', LABELS.graphile],
  ['bullmq', LABELS.bullmq],
] as const;

/** Tidings and the three peers, in one variant and group; `suffix` ends each label. */
function fourRows(variant: Variant, group: Row['group'], suffix = '', sizes?: Row['sizes'], peers: readonly (typeof PEERS)[number][] = PEERS): Row[] {
  return [
    { system: 'tidings', label: `${LABELS.tidings}${suffix}`, variant, group, reference: true, ...(sizes && { sizes }) },
    ...peers.map(([system, label]): Row => ({ system, label: `${label}${suffix}`, variant, group, ...(sizes && { sizes }) })),
  ];
}

/** Commits of the raw floor's single-row rows (bench/baselines/raw.ts). */
export function rawSingleRowCommits(rawEvents: number): number {
  return Math.round(rawEvents / 2);
}

/** Commits of the raw floor's transaction rows (BEGIN; INSERT; COMMIT, with the event or the business row). */
export function rawTransactions(rawEvents: number): number {
  return Math.round(rawEvents / 4);
}

/** Labels the targets (targets.ts) and the README read. */
export const ROW = {
  keyed1: 'Tidings, 1k keys, inbox, no-op (1 process)',
  keyed2: 'Tidings, 1k keys, inbox, no-op (2 processes)',
  keyedBusiness2: 'Tidings, 1k keys, inbox, business row + event (2 processes)',
  producersEmpty: 'Tidings, producers only, empty tx (no consumer; as many events as raw 10-conn commits)',
  producersBusiness: 'Tidings, producers only, business row + event (no consumer; as many as raw business tx)',
  drainSteadyKeyed: 'Tidings, 1k keys, inbox, no-op, steady',
  raw: 'PostgreSQL (pg)',
  telemetryOff: 'Tidings, telemetry off (as without @opentelemetry/api)',
  telemetryNoop: 'Tidings, no-op tracer and meter (API, no SDK)',
  telemetrySdk: 'Tidings, OTel SDK: every span to an in-memory exporter',
  /** Issue 23: each beside the same with `, RLS` (row-level security). */
  tenantsDrain: 'Tidings, 1k keys, inbox, 20 tenants, steady',
  tenantsE2e: 'Tidings, 1k keys, inbox, 20 tenants, no-op (1 process)',
  tenantsE2eTx: 'Tidings, 1k keys, inbox, 20 tenants, insert via ctx.tx (1 process)',
  quietAlone: 'Tidings, quiet tenants alone',
  quietNoisy: 'Tidings, quiet + noisy tenant, fairness off',
  quietNoisyFair: 'Tidings, quiet + noisy tenant, tenantConcurrency 1',
  quietNoisyIsolated: 'Tidings, quiet + noisy tenant on a subscription of its own',
} as const;

/** The label of a tenancy row with row-level security on. */
export const withRls = (label: string) => `${label}, RLS`;

/**
 * Issue 22's overhead rows: one workload's Tidings row with telemetry off (the reference), with the API and
 * no SDK, and with the SDK sampling every span; run beside each other in every round.
 */
function tracingRows(variant: Variant, suffix: string, sizes?: Row['sizes']): Row[] {
  const row = (label: string, telemetry: Variant['telemetry'], reference = false): Row => ({
    system: 'tidings',
    label: `${label}${suffix}`,
    variant: { ...variant, telemetry },
    group: 'tracing',
    ...(reference && { reference }),
    ...(sizes && { sizes }),
  });
  return [row(ROW.telemetryOff, 'off', true), row(ROW.telemetryNoop, 'noop'), row(ROW.telemetrySdk, 'sdk')];
}

/** The workloads in order; in each round every step runs its rows one after another (A B C, A B C ...). */
export function steps(quick: boolean, sizes: Sizes): Step[] {
  const steady = { events: sizes.steady, warmUpEvents: sizes.warmUp };
  const cold = { events: sizes.drain, warmUpEvents: 0 };
  const quarter = { events: sizes.drain, warmUpEvents: Math.round(sizes.drain / 4) };
  const guarantees: Row[] = [
    { system: 'tidings', label: ROW.drainSteadyKeyed, variant: keyed, group: 'guarantees', sizes: steady },
    { system: 'tidings', label: 'Tidings, 1k keys, inbox, insert via ctx.tx', variant: effects, group: 'guarantees', reference: true, sizes: quarter },
    ...(quick
      ? []
      : [
          { system: 'tidings', label: 'Tidings, 1k keys, inbox off, no-op', variant: noInbox, group: 'guarantees', sizes: quarter } satisfies Row,
          { system: 'pgboss', label: 'pg-boss, insert (own connection)', variant: effects, group: 'guarantees', sizes: quarter } satisfies Row,
          { system: 'graphile', label: 'graphile-worker, insert (own connection)', variant: effects, group: 'guarantees', sizes: quarter } satisfies Row,
          { system: 'bullmq', label: 'BullMQ (not durable), insert into PostgreSQL', variant: effects, group: 'guarantees', sizes: quarter } satisfies Row,
        ]),
  ];
  const producersOnly = (variant: Variant, label: string, events: number): Row => ({
    system: 'tidings',
    label,
    variant: { ...variant, producersOnly: true },
    group: 'guarantees',
    sizes: { events, publishSeconds: 0, warmUpEvents: Math.round(events / 4) },
  });
  const e2eGuarantees: Row[] = [
    { system: 'tidings', label: ROW.keyed1, variant: keyed, group: 'guarantees' },
    { system: 'tidings', label: ROW.keyed2, variant: { ...keyed, processes: 2 }, group: 'guarantees' },
    { system: 'tidings', label: ROW.keyedBusiness2, variant: { ...keyed, processes: 2, businessRow: true }, group: 'guarantees', reference: true },
    { system: 'tidings', label: 'Tidings, 1k keys, inbox, insert via ctx.tx (1 process)', variant: effects, group: 'guarantees' },
    producersOnly(plain, ROW.producersEmpty, rawSingleRowCommits(sizes.raw)),
    producersOnly({ ...plain, businessRow: true }, ROW.producersBusiness, rawTransactions(sizes.raw)),
  ];
  const latencyGuarantees: Row[] = [
    { system: 'tidings', label: ROW.keyed1, variant: keyed, group: 'guarantees', reference: true },
    { system: 'tidings', label: ROW.keyed2, variant: { ...keyed, processes: 2 }, group: 'guarantees' },
    { system: 'tidings', label: 'Tidings, 1k keys, inbox, insert via ctx.tx (1 process)', variant: effects, group: 'guarantees' },
  ];
  /** Issue 23: the cost of row-level security, each row with 20 tenants beside the same without it. */
  const tenants: Variant = { ...keyed, tenants: 20 };
  const tenancyPair = (label: string, variant: Variant, group: Row['group'], sizes?: Row['sizes']): Row[] => [
    { system: 'tenancy', label, variant, group, reference: true, ...(sizes && { sizes }) },
    { system: 'tenancy', label: withRls(label), variant: { ...variant, rls: true }, group, ...(sizes && { sizes }) },
  ];
  /**
   * Issue 23: the quiet tenants alone, then beside the noisy one, fairness off and on, and the noisy one on a
   * subscription of its own (what the machine's load alone does to the quiet tenants).
   */
  const fairness: Row[] = [
    { system: 'tenancy', label: ROW.quietAlone, variant: tenants, group: 'fairness', reference: true },
    { system: 'tenancy', label: ROW.quietNoisy, variant: { ...tenants, noisy: true }, group: 'fairness' },
    { system: 'tenancy', label: ROW.quietNoisyFair, variant: { ...tenants, noisy: true, fair: true }, group: 'fairness' },
    { system: 'tenancy', label: ROW.quietNoisyIsolated, variant: { ...tenants, noisy: true, isolated: true }, group: 'fairness' },
  ];
  /** A Tidings row of a scaling table; the table's first row is the one the others are compared with. */
  const tidingsScaling = (group: Row['group'], label: string, variant: Variant, rowSizes: Row['sizes'], reference: boolean): Row => ({
    system: 'tidings',
    label,
    variant,
    group,
    reference,
    ...(rowSizes && { sizes: rowSizes }),
  });
  return [
    { workload: 'raw', rows: [{ system: 'raw', label: ROW.raw, variant: plain, group: 'raw' }] },
    {
      workload: 'bulk',
      rows: [...fourRows(plain, 'cold', ', cold start', { events: sizes.bulk, warmUpEvents: 0 }), ...fourRows(plain, 'steady', ', steady', steady)],
    },
    {
      workload: 'drain',
      rows: [
        ...fourRows(plain, 'cold', ', cold start', cold),
        ...fourRows(plain, 'steady', ', steady', steady),
        ...guarantees,
        ...tracingRows(plain, ', steady', steady),
        ...tenancyPair(ROW.tenantsDrain, tenants, 'tenancy', steady),
      ],
    },
    {
      workload: 'e2e',
      rows: [
        ...fourRows(two, 'twoProcess', ' (2 processes)'),
        ...fourRows(plain, 'base', ' (1 process)'),
        ...fourRows({ ...two, businessRow: true }, 'business', ', business row + event (2 processes)', undefined, PEERS.slice(0, 2)),
        ...e2eGuarantees,
        ...tracingRows(plain, ' (1 process)'),
        ...tenancyPair(ROW.tenantsE2e, tenants, 'tenancy'),
        ...tenancyPair(ROW.tenantsE2eTx, { ...tenants, effects: true }, 'tenancyTx'),
      ],
    },
    { workload: 'standalone', rows: [...fourRows(two, 'twoProcess', ' (2 processes)'), ...fourRows(plain, 'base', ' (1 process)')] },
    {
      workload: 'latency',
      rows: [...fourRows(two, 'twoProcess', ' (2 processes)', { idleSeconds: 0 }), ...fourRows(plain, 'base', ' (1 process)'), ...latencyGuarantees],
    },
    {
      workload: 'backlog',
      once: true,
      rows: sizes.backlogs.map((n, i) =>
        tidingsScaling(
          'backlog',
          `Tidings, backlog ${n.toLocaleString('en-US')}`,
          keyed,
          { events: n, warmUpEvents: Math.min(sizes.warmUp, n), timeoutMs: backlogTimeoutMs(sizes, n) },
          i === 0,
        ),
      ),
    },
    {
      workload: 'e2e',
      once: true,
      rows: [
        ...sizes.subscriptionCounts.map((n, i) =>
          tidingsScaling(
            'subscriptions',
            `Tidings, ${n} subscription${n > 1 ? 's' : ''}`,
            { ...keyed, subscriptions: n },
            { events: sizes.subscriptionEvents, publishSeconds: 0, warmUpEvents: Math.round(sizes.subscriptionEvents / 4) },
            i === 0,
          ),
        ),
        ...sizes.payloads.map((bytes, i) =>
          tidingsScaling(
            'payload',
            `Tidings, payload ${bytes >= 1_000 ? `${bytes / 1_000} KB` : `${bytes} B`}`,
            { ...keyed, payloadBytes: bytes },
            undefined,
            i === 0,
          ),
        ),
      ],
    },
    {
      workload: 'scheduled',
      once: true,
      rows: [
        // Issue 21's latency target is at this rate: due time -> handler p99 under 100 ms at 1,000 due/s.
        ...fourRows(plain, 'time', `, ${perSecond(sizes.scheduledOnTime, sizes.scheduledSeconds)} due/s`, {
          events: sizes.scheduledOnTime,
          timeoutMs: sizes.timeoutMs,
          scheduleLeadMs: scheduleLead(quick, sizes.scheduledOnTime),
        }),
        ...fourRows(plain, 'time', `, ${perSecond(sizes.scheduled, sizes.scheduledSeconds)} due/s`, {
          events: sizes.scheduled,
          timeoutMs: sizes.timeoutMs,
        }),
      ],
    },
    {
      workload: 'request',
      once: true,
      rows: [
        { system: 'tidings', label: 'Tidings on PostgreSQL, bus.request (replier in another process)', variant: plain, group: 'time', reference: true },
        {
          system: 'rabbitmq',
          label: 'Tidings on RabbitMQ (outbox), bus.request (replier in another process)',
          variant: { ...plain, outbox: true },
          group: 'time',
        },
        { system: 'nats', label: 'Tidings on NATS (outbox), bus.request (replier in another process)', variant: { ...plain, outbox: true }, group: 'time' },
        { system: 'http', label: 'plain HTTP call on loopback (node:http, keep-alive)', variant: plain, group: 'time' },
        { system: 'natscore', label: 'NATS core request/reply (nothing stored)', variant: plain, group: 'time' },
      ],
    },
    { workload: 'saga', once: true, rows: [{ system: 'tidings', label: 'Tidings saga, 3 steps', variant: plain, group: 'time', reference: true }] },
    // Every round: a p99 of 2,000 quiet messages swings 2x-8x between single rounds (docs/tenancy.md).
    { workload: 'fairness', rows: fairness },
    ...brokerSteps().map((step) => ({ ...step, once: true })),
    { workload: 'fanout', rows: fourRows(plain, 'base', '', { events: sizes.fanoutEvents, warmUpEvents: sizes.fanoutWarmUp }) },
    { workload: 'login', once: true, rows: [replicaRow] },
    { workload: 'drift', once: true, rows: [replicaRow] },
  ];
}

/**
 * A backlog row's watchdog: the backlog is filled (~40k/s on a busy machine) and drained (~9k/s there, 30-55k/s
 * on a quiet one); 1,000,000 needs ~3 minutes on a machine shared with other work, more than the default.
 */
function backlogTimeoutMs(sizes: Sizes, events: number): number {
  return Math.max(sizes.timeoutMs, events * 0.6);
}

/** Time enough to schedule every job before the first is due (~5k jobs/s on a busy machine). */
function scheduleLead(quick: boolean, jobs: number): number {
  return quick ? 3_000 : 5_000 + jobs / 5;
}

function perSecond(jobs: number, seconds: number): string {
  return Math.round(jobs / seconds).toLocaleString('en-US');
}

/** Workload 9: Tidings replicas (issue 6), no peers; bench/tidings/replica.ts. */
const replicaRow: Row = { system: 'replica', label: 'Tidings replica', variant: plain, group: 'replica', reference: true };

export function taskFor(row: Row, workload: Workload, sizes: Sizes, db: { url: string; name: string }, quick: boolean, round: number): Task {
  const events: Record<Workload, number> = {
    raw: sizes.raw,
    bulk: sizes.bulk,
    drain: sizes.drain,
    backlog: sizes.drain,
    // Workloads 3 and 4 publish for `publishSeconds` unless the row says otherwise.
    e2e: 0,
    standalone: 0,
    fanout: sizes.fanoutEvents,
    latency: 0,
    login: sizes.replica.logins,
    drift: sizes.replica.driftKeys,
    scheduled: sizes.scheduled,
    request: 0,
    saga: sizes.sagas,
    fairness: 0,
  };
  const timed = workload === 'e2e' || workload === 'standalone';
  const task: Task = {
    system: row.system,
    label: row.label,
    workload,
    variant: row.variant,
    events: events[workload],
    warmUpEvents: 0,
    publishSeconds: timed ? sizes.publishSeconds : 0,
    fanout: sizes.fanout,
    rates: workload === 'request' ? [sizes.requestRate] : row.group === 'base' || row.group === 'twoProcess' ? sizes.baseRates : sizes.guaranteeRates,
    latencySeconds: workload === 'request' ? sizes.requestSeconds : sizes.latencySeconds,
    scheduledSeconds: sizes.scheduledSeconds,
    scheduleLeadMs: scheduleLead(quick, sizes.scheduled),
    // The idle cost is measured in the first round only (it waits ~30 s for pg_stat_database to settle).
    idleSeconds: row.group === 'base' && round === 1 ? sizes.idleSeconds : 0,
    pgUrl: db.url,
    database: db.name,
    redis: { host: '127.0.0.1', port: 6379 },
    quick,
    timeoutMs: sizes.timeoutMs,
    replica: sizes.replica,
    fairness: sizes.fairness,
    ...row.sizes,
  };
  return isBrokerRow(row) ? brokerTask(task, row, quick) : task;
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
  backlog: 'Scaling: drain and time to first message vs backlog (1 subscription, 1k keys, inbox)',
  scheduled: 'Scheduled delivery: jobs due over a window (delivered/s from the first due time, lateness)',
  request: 'Request/reply: round trip at a fixed rate, open loop',
  saga: 'Sagas: 3 steps each, state in PostgreSQL (transitions/s)',
  fairness: "Fairness (issue 23): 20 quiet tenants at 10/s each, alone and beside a noisy tenant's backlog and 5,000/s (latency: publish -> handler start)",
};
