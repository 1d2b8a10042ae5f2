/** What the parent asks a child process to run, and what the child answers. Shared by both sides. */

export type Workload =
  | 'raw'
  | 'bulk'
  | 'drain'
  | 'e2e'
  | 'standalone'
  | 'fanout'
  | 'latency'
  | 'login'
  | 'drift'
  | 'backlog'
  | 'scheduled'
  | 'request'
  | 'saga'
  | 'fairness';
export type SystemName =
  | 'tidings'
  | 'pgboss'
  | 'graphile'
  | 'bullmq'
  | 'raw'
  | 'replica'
  | 'rabbitmq'
  | 'amqp'
  | 'nats'
  | 'natsjs'
  /** Request/reply baselines: a plain HTTP call on loopback, NATS core request/reply. */
  | 'http'
  | 'natscore'
  /** Tidings on PostgreSQL with tenants (issue 23): row-level security's cost on drain and e2e, and the fairness workload. */
  | 'tenancy';

export interface Variant {
  /** Distinct keys the events use; 0: every event has its own key. */
  keys: number;
  /** The handler writes one row per message to `bench_effects` (in Tidings through `ctx.tx`, its transaction). */
  effects: boolean;
  /** Tidings only: the per-message-id inbox (on by default). */
  inbox: boolean;
  /** Tidings on a broker: publishes go through a PostgreSQL outbox and the relay (bench/tidings/on-broker.ts). */
  outbox?: boolean;
  /** Workload 3 with nothing consuming: the producers' own commit rate (T5). */
  producersOnly?: boolean;
  /** Workload 3: each transaction also inserts one business row (`bench_business`), as an application's would. */
  businessRow?: boolean;
  /** Producers in one process, the consumer in another (as two services run); 1 when absent. */
  processes?: 1 | 2;
  /** Bytes of the event's filler (the whole event is ~40 B more); 210 (~250 B of JSON) when absent. */
  payloadBytes?: number;
  /** Subscriptions that each receive every event (e2e vs subscriptions); 1 when absent. */
  subscriptions?: number;
  /**
   * Tidings' traces and metrics (issue 22, bench/tidings/telemetry.ts): `off` as without `@opentelemetry/api`
   * (`telemetry: false`, the same path), `noop` the API with no SDK (the default, and every other row), `sdk`
   * every span sampled into an in-memory exporter and the metrics read every 5 s.
   */
  telemetry?: 'off' | 'noop' | 'sdk';
  /** Tidings: events carry one of this many tenants (`t0`, `t1`, ...); none when absent. */
  tenants?: number;
  /** Tidings: `tenancy: { isolation: 'rls' }`, handlers confined to their tenant's rows by row-level security. */
  rls?: boolean;
  /** Fairness workload: the noisy tenant publishes (with its backlog) beside the quiet ones. */
  noisy?: boolean;
  /** Fairness workload: the subscription shares handler slots between tenants (`tenantConcurrency`). */
  fair?: boolean;
  /**
   * Fairness workload: the noisy tenant's events on a topic and subscription of their own, in the same
   * process: the same load on the machine, no subscription shared (as a queue per tenant would be).
   */
  isolated?: boolean;
}

export interface Task {
  system: SystemName;
  /** Label of the row this task belongs to, e.g. `tidings` or `tidings, 1,000 keys + effects`. */
  label: string;
  workload: Workload;
  variant: Variant;
  /** Events per run (bulk, drain, e2e, standalone, backlog, scheduled), or events before fan-out (fanout). */
  events: number;
  /** Bulk, drain, fan-out, backlog: events run through first in the same process, unmeasured (0: a cold start). */
  warmUpEvents: number;
  /**
   * Workloads 3 and 4: publish for this many seconds, measured, after a warm-up (see `warmUp`), instead of
   * `events` events; 0: `events`.
   */
  publishSeconds: number;
  /** Subscriptions of the fan-out workload. */
  fanout: number;
  /** Latency workload: producer rates (events/s) and seconds at each (also the request/reply rows' rate and seconds). */
  rates: number[];
  latencySeconds: number;
  /** Scheduled delivery: the jobs (`events`) are due over this many seconds, starting `scheduleLeadMs` after the task begins. */
  scheduledSeconds: number;
  scheduleLeadMs: number;
  /** Seconds of the idle window after the latency phases (0: skip). */
  idleSeconds: number;
  pgUrl: string;
  /** Database of `pgUrl`, for pg_stat_database. */
  database: string;
  redis: { host: string; port: number };
  quick: boolean;
  /** The child gives up after this long. */
  timeoutMs: number;
  /** Workload 9 (bench/tidings/replica.ts): logins per path at a fixed concurrency, and the drift check's keys. */
  replica?: ReplicaSizes;
  /** The fairness workload (bench/tidings/fairness.ts). */
  fairness?: FairnessSizes;
}

/** Issue 23's fairness workload: one noisy tenant with a backlog, quiet tenants at a low rate each. */
export interface FairnessSizes {
  /** Messages of the noisy tenant stored before the subscription starts. */
  backlog: number;
  /** Events/s the noisy tenant publishes while measured. */
  noisyRate: number;
  quietTenants: number;
  /** Events/s of each quiet tenant. */
  quietRate: number;
  /** Seconds of publishing measured. */
  seconds: number;
}

export interface ReplicaSizes {
  logins: number;
  /** Logins in flight; at most libuv's thread pool (4), where scrypt runs, or both paths measure its queue. */
  concurrency: number;
  /** Users in identity's table (and the replica). */
  users: number;
  driftKeys: number;
  /** Differing keys of the successive drift checks. */
  differences: number[];
}

export interface LatencySeries {
  rate: number;
  /** [percentile, ms] pairs, for the distribution chart. */
  quantiles: Array<[number, number]>;
}

export interface ChildResult {
  ok: boolean;
  error?: string;
  /** Named figures; rates are events/s, latencies ms, CPU % of all cores. */
  metrics: Record<string, number>;
  series?: LatencySeries[];
  notes?: string[];
}

export const RESULT_MARK = '@@BENCH-RESULT ';
