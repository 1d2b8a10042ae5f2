/**
 * The RabbitMQ backbone: Tidings' topology on a RabbitMQ server (docs/rabbitmq.md), publisher confirms,
 * per-key order through partition queues with a single active consumer, shared out among a subscription's
 * workers; delayed retries through delay queues, with the keys they hold recorded in the broker; dead-letter
 * queues. With `outbox: postgres(...)`, publishes in a transaction go through the
 * PostgreSQL outbox and a relay, and handlers get a transaction and an inbox (src/outbox).
 *
 * The folder: options.ts, broker.ts, publisher.ts, consume/ (consumer.ts and a reader per partition;
 * workers.ts says who reads which partition, holds.ts keeps held keys in the broker, acks.ts and slots.ts),
 * topology.ts (exchanges and queues), dead-letters.ts, codec.ts (envelope <-> AMQP message), connection.ts,
 * owners.ts (commands' owners).
 */
import { brokered, type BrokerBackbone } from '../outbox/index.ts';
import { RabbitBroker } from './broker.ts';
import type { RabbitMqBackboneOptions } from './options.ts';

export { BUCKETS, CE_PREFIX, routingKey } from './codec.ts';
export { partitionPatterns } from './topology.ts';
export { Names } from './topology.ts';
export { RabbitDeadLetters } from './dead-letters.ts';
export { RabbitBroker } from './broker.ts';
export { rabbitmqDefaults, type RabbitMqOptions, type RabbitMqBackboneOptions } from './options.ts';

/**
 * The RabbitMQ backbone for `createBus`: `rabbitmq({ url, outbox: postgres({ url: DATABASE_URL }) })`.
 * Without an outbox, standalone publishes and consumers work, but not `bus.transaction` or `ctx.tx`.
 */
export function rabbitmq(options: RabbitMqBackboneOptions): BrokerBackbone {
  const { outbox, relay, onWarning, tenancy } = options;
  return brokered(new RabbitBroker(options), { outbox, relay, onWarning, tenancy });
}
