/**
 * The NATS JetStream backbone. `nats({ servers })` carries Tidings' messages on a JetStream stream; with
 * `outbox: postgres(...)` it also takes publishes made in a database transaction (through the outbox and
 * its relay) and gives handlers a transaction that commits with their inbox record. See docs/nats.md.
 *
 * The folder: options.ts, broker.ts, connection.ts (and client.ts, which loads nats.js), topology.ts (the
 * streams and KV buckets), publisher.ts, consume/ (buckets, leases, pulling, running keys) with pull.ts,
 * workers.ts (who handles which topics), holds.ts (delayed retries kept across crashes), dead-letters.ts,
 * codec.ts (envelope <-> message), kv.ts, context.ts and errors.ts.
 */
import { brokered, type BrokerBackbone } from '../outbox/index.ts';
import { NatsBroker } from './broker.ts';
import type { NatsOptions } from './options.ts';

export function nats(options: NatsOptions): BrokerBackbone {
  const { outbox, relay, onWarning } = options;
  return brokered(new NatsBroker(options), { outbox, relay, onWarning });
}

export { NatsConsumer } from './consume/consumer.ts';
export { NatsDeadLetters } from './dead-letters.ts';
export { NatsBroker } from './broker.ts';
export { bucketSubjects } from './topology.ts';
export { natsDefaults, resolveNatsSettings, type NatsOptions, type NatsSettings } from './options.ts';
export type { NatsContext } from './context.ts';
