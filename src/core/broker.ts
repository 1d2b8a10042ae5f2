import type { Consumer, DeliveryHandler, Outgoing, SubscriptionSpec } from './backbone.ts';
import type { BackboneDescription, ContractRegistry } from './catalog.ts';
import type { DeadLetterStore } from './dead-letters.ts';
import type { HealthCheck } from '../telemetry/status.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { BackboneStatus } from '../telemetry/status.ts';

/**
 * A message broker that carries Tidings' messages (RabbitMQ, NATS JetStream). It stores and delivers; it
 * has no transaction of its own. `brokered()` (src/outbox) turns a broker into a full backbone: publishes
 * made in a database transaction go through a PostgreSQL outbox and a relay, and handlers get a database
 * transaction that commits with the inbox record.
 *
 * What a broker guarantees:
 * - `publish` resolves once the broker has every message durably (publisher confirms, JetStream acks).
 *   Messages given in one call, and in calls awaited one after another, keep their order per key.
 * - `consume` delivers at least once; equal partition keys reach the handler in publication order, one at a
 *   time, also across the subscription's topics and across processes; a key waiting for a delayed retry
 *   holds back only that key. `Delivery.tx` is always undefined; `attempt` counts deliveries across
 *   restarts as far as the broker records them.
 * - `retry` results wait `delayMs` on the broker side or in the consumer; `dead-letter` results, and
 *   messages that cannot be decoded, go to the broker's dead letters with their error history.
 */
export interface Broker {
  readonly name: string;
  /** Connects and declares the topology it needs. Idempotent. */
  open(): Promise<void>;
  publish(messages: readonly Outgoing[]): Promise<void>;
  consume(subscription: SubscriptionSpec, handle: DeliveryHandler<undefined>): Promise<Consumer>;
  /** Optional: a contracts registry of the broker's own, used when the backbone has no outbox database (NATS KV). */
  contracts?(): ContractRegistry;
  /** Optional: the settings that name things on the broker (prefix, stream), for AsyncAPI bindings. */
  describe?(): BackboneDescription;
  /** Dead letters kept by this broker, for the CLI and tools. */
  deadLetters(): DeadLetterStore;
  close(): Promise<void>;
  /** Optional: whether the broker is reachable now, for `bus.health()`. */
  health?(): Promise<readonly HealthCheck[]>;
  /** Optional: lag, held keys and dead letters of the subscriptions it consumes, for the metrics' gauges. */
  status?(): Promise<BackboneStatus>;
  /** Optional: the bus's telemetry, told of lost connections and leases. */
  observe?(observer: BackboneObserver): void;
}
