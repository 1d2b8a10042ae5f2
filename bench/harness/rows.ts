/** A row of a report table (one system in one configuration) and a step of the plan (a workload and its rows). */
import type { SystemName, Variant, Workload } from '../protocol.ts';

export interface Row {
  system: SystemName;
  label: string;
  variant: Variant;
  /** Rows of one table share a group; the ratio column compares each with its group's reference row. */
  group: 'base' | 'guarantees' | 'raw' | 'replica' | 'rabbitmq' | 'nats';
  /** The Tidings row the others of its table are compared with. */
  reference?: boolean;
}

export interface Step {
  workload: Workload;
  rows: Row[];
}
