import type { BackboneDescription, ContractRegistry } from './catalog.ts';
import type { AnyContract } from './contract.ts';
import type { Envelope } from './envelope.ts';
import type { DeadLetterStore } from './dead-letters.ts';
import type { ErrorRecord } from './errors.ts';
import type { ResolvedRetry } from './options.ts';
import type { BackboneStatus, HealthCheck } from '../telemetry/status.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';

/**
 * The seam between the bus and what carries its messages. A backbone stores and delivers envelopes; the
 * core does everything else (contracts, validation, handlers, middleware, the retry policy). Adding a
 * backbone means implementing this interface and passing the conformance suite.
 *
 * Guarantees every backbone gives:
 * - `publish` with a transaction writes iff that transaction commits; without one it resolves once the
 *   messages are durable. Safe to call concurrently.
 * - Delivery is at least once. Messages with equal partition keys reach a subscription's handler in
 *   publication (commit) order, one at a time; a key waiting for a retry holds back only that key.
 * - A delivery's `tx`, when the backbone offers one, commits together with the acknowledgement.
 */
export interface Backbone<Tx = unknown> {
  readonly name: string;
  /** Connects and prepares storage (migrations, topology). Idempotent. */
  open(): Promise<void>;
  /** Writes messages; `tx` enlists them in the caller's transaction (a transactional outbox). */
  publish(messages: readonly Outgoing[], tx?: Tx): Promise<void>;
  /**
   * Optional, for a large `publishMany`, in the caller's transaction or one the bus opens for it: writes
   * the messages chunk by chunk as the bus encodes them, so storing the first overlaps encoding the next.
   * Iterating `chunks` may throw (a message that cannot be serialised); then `tx` must not commit any of them.
   */
  publishChunks?(chunks: Iterable<readonly Outgoing[]>, tx: Tx): Promise<void>;
  /**
   * Optional, for per-tenant quotas (`tenancy.quotas`, core/quotas.ts): resolves once `count` messages of
   * `contract` for `tenant` fit the tenant's publish rate, or rejects with TENANT_RATE_LIMITED. The bus asks
   * before it writes what a caller publishes (not what handlers publish). `tx`: the caller's transaction.
   */
  admit?(tenant: string, contract: AnyContract, count: number, tx?: Tx): Promise<void>;
  /**
   * Optional: cancels a message published with `dueAt` that is not due yet; true if it was (then it is never
   * delivered), false if it is unknown, delivered already, or being delivered. A backbone without it refuses
   * messages with `dueAt`.
   */
  cancelScheduled?(id: string): Promise<boolean>;
  /**
   * Optional, for recurring schedules (core/schedules.ts): records in `tx` that schedule `name` (described by
   * `definition`) fired its tick at `tick` (epoch ms), unless a tick as late was recorded already. True for
   * the one caller that claimed it, which publishes the tick's message in the same `tx`: one publish per tick
   * however many processes run the schedule.
   */
  claimTick?(name: string, definition: string, tick: number, tx: Tx): Promise<boolean>;
  /** Optional, with `claimTick`: the last tick recorded for `name`, and the definition it was fired under. */
  lastTick?(name: string): Promise<{ readonly tick: number; readonly definition: string } | undefined>;
  /**
   * Optional, with `claimTick`: a backbone that keeps each tenant's data apart (tidings/stamps) names its
   * tenants here, and a schedule fires each tick once per tenant, claimed and published inside
   * `withTenant(tenant)` (its transaction, `claimTick` and `lastTick` are that tenant's).
   */
  tickTenants?(): readonly string[];
  /**
   * Optional, for request/reply (`bus.request`): records the answer to request `requestId`, in `tx` (the
   * handler's: it exists iff the request is acknowledged) or on its own (an error answer), and wakes whoever
   * waits for it, in any process. The first answer to a request stands.
   */
  reply?(requestId: string, reply: Reply, tx?: Tx): Promise<void>;
  /**
   * Optional, with `reply`: resolves with the answer to `requestId` once it is recorded (waiting costs
   * nothing while no request is open). After `signal` aborts, an answer that still comes is dropped, and
   * `late` is called.
   */
  awaitReply?(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply>;
  /** Optional: where saga instances live, saved in handlers' transactions (core/saga.ts). */
  sagas?(): SagaStore<Tx>;
  /** Optional: where services record their contracts and subscriptions when they start (core/catalog.ts); undefined if none. */
  contracts?(): ContractRegistry | undefined;
  /** Optional: the settings that name things on this backbone (schema, prefix, stream), for AsyncAPI bindings. */
  describe?(): BackboneDescription;
  /** Runs `fn` in a transaction of the backbone's database; consumers are woken after it commits. */
  transaction<T>(fn: (tx: Tx) => Promise<T>): Promise<T>;
  /** Starts consuming; resolves once the subscription is registered and its workers run. */
  consume(subscription: SubscriptionSpec, handle: DeliveryHandler<Tx>): Promise<Consumer>;
  /** The messages subscriptions gave up on, to inspect, redrive or drop. Opens the backbone if needed. */
  deadLetters(): DeadLetterStore;
  /** Closes connections it opened. Consumers must be stopped first. */
  close(): Promise<void>;
  /** Optional: lag, held keys and dead letters per subscription (and the relay's backlog), for the metrics' gauges (src/telemetry). */
  status?(): Promise<BackboneStatus>;
  /** Optional: what readiness depends on (the database or broker reachable, the notifier), for `bus.health()`. */
  health?(): Promise<readonly HealthCheck[]>;
  /** Optional: the bus hands over its telemetry (relay and receive spans, connection and lease events) before it opens the backbone. */
  observe?(observer: BackboneObserver): void;
}

/** A request's answer: the reply's data (as JSON carries it), or the error the request ended with. */
export interface Reply {
  readonly data?: unknown;
  readonly error?: ErrorRecord;
}

/** An envelope ready to be written: its data already serialised, its key hashed. */
export interface Outgoing {
  readonly envelope: Envelope;
  /** `envelope.data` as JSON text, as JSON.stringify writes it (every control character escaped). */
  readonly json: string;
  readonly keyHash: number;
  /** Epoch milliseconds when it is due, for a message scheduled for later: it enters its key's order then. */
  readonly dueAt?: number | undefined;
}

export interface Consumer {
  /** Graceful: stops taking new work, finishes and acknowledges what is in flight, releases leases. */
  stop(): Promise<void>;
}

/** In `SubscriptionSpec.topics`: every topic, present and future (the outbox relay reads this way). */
export const EVERY_TOPIC = '*';

/**
 * The warning of a backbone that reads in its broker's order, for a subscription that asks for fair shares
 * between tenants: the options would otherwise be ignored without a word (docs/tenancy.md, "Fair delivery").
 */
export function fairSharesIgnored(spec: SubscriptionSpec, backbone: 'RabbitMQ' | 'NATS', ownPlace: string): string | undefined {
  if (spec.tenantShares === undefined) return undefined;
  return `Subscription ${spec.name}: tenantConcurrency and tenantWeights apply on PostgreSQL only, and are ignored on ${backbone}; to keep a noisy tenant from holding up the others there, give each tenant ${ownPlace} of its own with tenantStamps (docs/tenancy.md, "A backbone per tenant")`;
}

/** Fair shares of handler slots between tenants: the subscription options `tenantConcurrency` and `tenantWeights`. */
export interface TenantShares {
  /** Keys of one tenant in flight at once (times its weight); undefined: no cap. */
  readonly perTenant: number | undefined;
  /** A tenant's share relative to the others' (1 unless named). */
  readonly weights: Readonly<Record<string, number>>;
}

/** A tenant's weight (1 unless named; never 0, so that every tenant keeps a turn). */
export function shareWeight(shares: TenantShares, tenant: string): number {
  return Math.max(shares.weights[tenant] ?? 1, 0.001);
}

/** How many keys a tenant of `weight` may have in flight at once (at least 1; infinite without a cap). */
export function shareCap(shares: TenantShares, weight: number): number {
  return shares.perTenant === undefined ? Number.POSITIVE_INFINITY : Math.max(1, Math.floor(shares.perTenant * weight));
}

export interface SubscriptionSpec {
  readonly name: string;
  /** Topic names, or `[EVERY_TOPIC]`. */
  readonly topics: readonly string[];
  /** How many ordered lanes the subscription's keys are hashed into; workers lease whole partitions. */
  readonly partitions: number;
  /** Handlers in flight at once per subscription in one process (different keys only). */
  readonly concurrency: number;
  /** Messages read per batch. */
  readonly batchSize: number;
  /** Record handled message ids so a redelivered or redriven message is handled once. */
  readonly inbox: boolean;
  /** Where a new subscription starts reading. */
  readonly startFrom: 'now' | 'beginning';
  /**
   * The topics among `topics` that carry commands: a command has one owner, so a backbone refuses a second
   * subscription of one (SUBSCRIPTION_CONFLICT naming both), while events fan out to every subscription.
   */
  readonly commands?: readonly string[] | undefined;
  /** The retry policy, for failures below the handler (core/attempts.ts); the subscription defaults' if absent. */
  readonly retry?: ResolvedRetry | undefined;
  /** Its handlers may touch every tenant's data (a backbone that enforces tenancy lets them). */
  readonly crossTenant?: boolean | undefined;
  /** Fair shares of handler slots between tenants, for a backbone that schedules by tenant (PostgreSQL, memory). */
  readonly tenantShares?: TenantShares | undefined;
}

export type { AttemptRecord } from './errors.ts';

export interface Delivery<Tx = unknown> {
  /** Decoded as far as the backbone can; the core validates the rest. */
  readonly envelope: Envelope;
  /** 1 for the first attempt; counts every attempt over the message's life, across restarts. */
  readonly attempt: number;
  /** A transaction scoped to this attempt that commits with the acknowledgement, if the backbone has one. */
  readonly tx: Tx | undefined;
}

/** What the backbone must do with a delivery after one attempt. */
export type DeliveryResult =
  | { readonly outcome: 'ack' }
  | { readonly outcome: 'retry'; readonly delayMs: number; readonly error: ErrorRecord }
  | { readonly outcome: 'dead-letter'; readonly reason: string; readonly error: ErrorRecord };

export type DeliveryHandler<Tx = unknown> = (delivery: Delivery<Tx>) => Promise<DeliveryResult>;

// ---- saga state, for backbones that keep it (core/saga.ts runs the sagas) ------------------------------

/** An instance as the store keeps it. */
export interface SagaRow {
  readonly state: unknown;
  readonly version: number;
  readonly completed: boolean;
}

/** What a transition records besides the state: the message that caused it. */
interface SagaCause {
  readonly messageId: string;
  readonly topic: string;
}

/** Where a backbone keeps saga instances, in its handlers' transactions. */
export interface SagaStore<Tx> {
  /** The instance, locked until `tx` ends (a second transition of it waits), or undefined if it has not started. */
  load(tx: Tx, saga: string, id: string): Promise<SagaRow | undefined>;
  /**
   * Saves the instance's new state at `version` (the loaded one + 1; 1 for a start). False if another
   * transaction started it meanwhile: the caller retries on the new state.
   */
  save(tx: Tx, saga: string, id: string, row: SagaRow, cause: SagaCause): Promise<boolean>;
  /** The instance as last committed, for operators and tests; undefined if it never started. */
  find(saga: string, id: string): Promise<SagaRow | undefined>;
}
