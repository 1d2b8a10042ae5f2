import type { SqlDriver } from '../connection/driver.ts';
import type { AckGroup } from './ack-group.ts';
import type { Notifier } from '../notifier.ts';
import type { Statements } from '../statements.ts';
import type { BackboneObserver } from '../../telemetry/observer.ts';
import type { Isolation } from '../tenants.ts';
import type { SuspendedTenants } from './suspended.ts';

export interface ConsumerSettings {
  readonly leaseMs: number;
  readonly heartbeatMs: number;
  /** Backstop poll while LISTEN works: a lost notification costs at most this much latency. */
  readonly pollMs: number;
  /** Poll interval when LISTEN is unavailable. */
  readonly fallbackPollMs: number;
  readonly errorBackoffMaxMs: number;
  /**
   * Transactions (so connections) a batch whose handlers write through `ctx.tx` is split into, by partition;
   * 1 keeps one. Forced to 1 on a driver with one session (PGlite).
   */
  readonly handlerConnections: number;
}

/** What a consumer's parts share: the backbone's connections, statements and notifier, and this worker's name. */
export interface ConsumerContext {
  readonly driver: SqlDriver;
  readonly sql: Statements;
  readonly notifier: Notifier;
  /** Commits the acknowledgements that commit alone, of every subscription of the backbone, together (ack-group.ts). */
  readonly acks: AckGroup;
  readonly settings: ConsumerSettings;
  readonly warn: (message: string, error?: unknown) => void;
  /** Wakes consumers of topics published inside a consumer's transaction, once it committed. */
  readonly committed: (topics: ReadonlySet<string>) => void;
  /** This process's workers on the backbone: a consumer is in it while registered in `workers`. */
  readonly workers: Set<string>;
  /** The bus's telemetry, told when a lease is lost (`lease:lost`). */
  readonly observer?: BackboneObserver | undefined;
  /** Tenant isolation by row-level security (tenants.ts), when `tenancy.isolation` is 'rls'. */
  readonly isolation?: Isolation | undefined;
  /** Tenants whose messages wait instead of being handled (suspended.ts). */
  readonly suspended?: Pick<SuspendedTenants, 'has'> | undefined;
}
