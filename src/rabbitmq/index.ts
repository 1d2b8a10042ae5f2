/**
 * The RabbitMQ backbone: Tidings' topology on a RabbitMQ server (docs/rabbitmq.md), publisher confirms,
 * per-key order through partition queues with a single active consumer, shared out among a subscription's
 * workers; delayed retries through delay queues, with the keys they hold recorded in the broker; dead-letter
 * queues. With `outbox: postgres(...)`, publishes in a transaction go through the
 * PostgreSQL outbox and a relay, and handlers get a transaction and an inbox (src/outbox).
 *
 * The folder: options.ts, broker.ts, publisher.ts, consume/ (a subscription's workers and partition readers),
 * workers.ts (who reads which partition), holds.ts (held keys kept in the broker), topology.ts (exchanges and
 * queues), dead-letters.ts, codec.ts (envelope <-> AMQP message), connection.ts, acks.ts and slots.ts.
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
  const { outbox, relay, onWarning } = options;
  return brokered(new RabbitBroker(options), { outbox, relay, onWarning });
}
