/**
 * The NATS JetStream backbone. `nats({ servers })` carries Tidings' messages on a JetStream stream; with
 * `outbox: postgres(...)` it also takes publishes made in a database transaction (through the outbox and
 * its relay) and gives handlers a transaction that commits with their inbox record. See docs/nats.md.
 *
 * The folder: options.ts, broker.ts, connection.ts (and client.ts, which loads nats.js), topology.ts (the
 * streams and KV buckets), publisher.ts, consume/ (consumer.ts wires leases, pulling, running keys and their
 * outcomes; workers.ts says who handles which topics, holds.ts keeps delayed retries across crashes, pull.ts
 * makes the pull requests), dead-letters.ts, codec.ts (envelope <-> message), owners.ts (commands' owners),
 * kv.ts, context.ts and errors.ts.
 */
import { brokered, type BrokerBackbone } from '../outbox/index.ts';
import { NatsBroker } from './broker.ts';
import type { NatsOptions } from './options.ts';

export function nats(options: NatsOptions): BrokerBackbone {
  const { outbox, relay, onWarning, tenancy } = options;
  return brokered(new NatsBroker(options), { outbox, relay, onWarning, tenancy });
}

export { NatsConsumer } from './consume/consumer.ts';
export { NatsDeadLetters } from './dead-letters.ts';
export { NatsBroker } from './broker.ts';
export { bucketSubjects } from './topology.ts';
export { natsDefaults, resolveNatsSettings, type NatsOptions, type NatsSettings } from './options.ts';
export type { NatsContext } from './context.ts';
