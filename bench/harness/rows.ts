/** A row of a report table (one system in one configuration) and a step of the plan (a workload and its rows). */
import type { SystemName, Task, Variant, Workload } from '../protocol.ts';

/** The kinds of table: rows of one group share a table, and its ratio column compares with the group's reference. */
export type Group =
  | 'base'
  | 'twoProcess'
  | 'business'
  | 'cold'
  | 'steady'
  | 'guarantees'
  | 'raw'
  | 'replica'
  | 'rabbitmq'
  | 'nats'
  /** The brokers' steady drain rows (issue 24), beside their cold ones. */
  | 'rabbitmqSteady'
  | 'natsSteady'
  | 'backlog'
  | 'subscriptions'
  | 'payload'
  | 'time'
  /** Issue 22: the cost of traces and metrics (telemetry off, no-op, full sampling); `--only tracing` runs them alone. */
  | 'tracing'
  | 'tenancy'
  | 'tenancyTx'
  | 'fairness';

export interface Row {
  system: SystemName;
  label: string;
  variant: Variant;
  /** Rows of one table share a group; the ratio column compares each with its group's reference row. */
  group: Group;
  /** The Tidings row the others of its table are compared with. */
  reference?: boolean;
  /** This row's own sizes over the workload's (events, warm-up, rates...). */
  sizes?: Partial<Pick<Task, 'events' | 'warmUpEvents' | 'publishSeconds' | 'rates' | 'idleSeconds' | 'timeoutMs' | 'scheduleLeadMs'>>;
}

export interface Step {
  workload: Workload;
  rows: Row[];
  /** Run in the first round only (scaling curves, issue 21's rows, replicas, brokers): keeps the full run short. */
  once?: boolean;
}
