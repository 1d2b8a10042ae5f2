/**
 * The names and declarations of everything Tidings keeps in RabbitMQ. Every declaration is idempotent
 * (declared again on every open and every reconnect), so a deleted queue or exchange comes back.
 *
 *   <prefix><topic>                    topic exchange per contract; routing key = the 10 bits of
 *                                      keyHash % 1024 as words (`0.1.1.0.0.1.0.1.1.1`)
 *   <prefix><subscription>:p<n>        partition queue n: binds the buckets b with b % partitions == n
 *                                      of each of the subscription's topics (`#.1.0`: n = 2 of 4);
 *                                      single active consumer
 *   <prefix><subscription>:return      headers exchange; retried and redriven messages come back through it
 *                                      to the partition named by their tidings-partition header
 *   <prefix><subscription>:retry:<ms>  a delayed retry waits here (x-message-ttl), then dead-letters into
 *                                      the return exchange
 *   <prefix><subscription>:p<n>:holds  the holds of partition n (keys waiting for a delayed retry), read by
 *                                      whoever consumes partition n; single active consumer (holds.ts);
 *                                      declared when the partition first holds a key
 *   <prefix><subscription>:workers     fanout exchange; the subscription's workers announce themselves on it
 *                                      (workers.ts), each through an exclusive queue of its own
 *   <prefix><subscription>:dead        the subscription's dead letters
 *   <prefix>dead-letter-queues         which subscriptions have dead-letter queues (for the CLI)
 *
 * The `:` keeps subscription names apart from topic names, which cannot contain it.
 */
import type { Channel } from 'amqplib';
import { bits, BUCKET_BITS, bucketKey, BUCKETS, H_PARTITION } from './codec.ts';

export interface TopologySettings {
  readonly prefix: string;
  readonly quorum: boolean;
}

export class Names {
  constructor(readonly prefix: string) {}
  exchange(topic: string): string {
    return `${this.prefix}${topic}`;
  }
  partition(subscription: string, partition: number): string {
    return `${this.prefix}${subscription}:p${partition}`;
  }
  holds(subscription: string, partition: number): string {
    return `${this.prefix}${subscription}:p${partition}:holds`;
  }
  workers(subscription: string): string {
    return `${this.prefix}${subscription}:workers`;
  }
  returnExchange(subscription: string): string {
    return `${this.prefix}${subscription}:return`;
  }
  retryQueue(subscription: string, delayMs: number): string {
    return `${this.prefix}${subscription}:retry:${delayMs}`;
  }
  deadQueue(subscription: string): string {
    return `${this.prefix}${subscription}:dead`;
  }
  get registry(): string {
    return `${this.prefix}dead-letter-queues`;
  }
}

/** Durable, quorum (replicated, counts redeliveries) or classic. */
function queueArguments(settings: TopologySettings, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { 'x-queue-type': settings.quorum ? 'quorum' : 'classic', ...extra };
}

export async function declareExchange(channel: Channel, names: Names, topic: string): Promise<void> {
  await channel.assertExchange(names.exchange(topic), 'topic', { durable: true });
}

interface SubscriptionTopology {
  readonly name: string;
  readonly topics: readonly string[];
  readonly partitions: number;
}

/**
 * The subscription's queues, exchanges and bindings, every partition's included: a partition that no worker
 * reads at the moment must still receive its messages. Bindings are declared in one pipelined burst (amqplib
 * queues the calls on the channel): one per partition and topic, or 1,024 per topic when the partition
 * count is not a power of two.
 */
export async function declareSubscription(channel: Channel, names: Names, settings: TopologySettings, spec: SubscriptionTopology): Promise<void> {
  await declareExchanges(channel, names, spec);
  await channel.assertExchange(names.workers(spec.name), 'fanout', { durable: true });
  await channel.assertQueue(names.deadQueue(spec.name), { durable: true, arguments: queueArguments(settings) });
  await Promise.all(Array.from({ length: spec.partitions }, (_, partition) => declarePartition(channel, names, settings, spec, partition)));
}

/** The exchanges a partition queue is bound to: the topics' and the return exchange. */
export async function declareExchanges(channel: Channel, names: Names, spec: SubscriptionTopology): Promise<void> {
  await Promise.all([
    ...spec.topics.map((topic) => declareExchange(channel, names, topic)),
    channel.assertExchange(names.returnExchange(spec.name), 'headers', { durable: true }),
  ]);
}

/** One partition's queue and bindings; declared again by its reader on every channel it opens, so a deleted queue comes back. */
export async function declarePartition(
  channel: Channel,
  names: Names,
  settings: TopologySettings,
  spec: SubscriptionTopology,
  partition: number,
): Promise<void> {
  const queue = names.partition(spec.name, partition);
  await channel.assertQueue(queue, { durable: true, arguments: queueArguments(settings, { 'x-single-active-consumer': true }) });
  const bindings: Promise<unknown>[] = [channel.bindQueue(queue, names.returnExchange(spec.name), '', { 'x-match': 'all', [H_PARTITION]: String(partition) })];
  for (const topic of spec.topics) {
    for (const [p, pattern] of partitionPatterns(spec.partitions)) if (p === partition) bindings.push(channel.bindQueue(queue, names.exchange(topic), pattern));
  }
  await Promise.all(bindings);
}

/**
 * A partition's holds queue (holds.ts): declared the first time the partition holds a key, so a subscription
 * that never retries after a delay has none (each queue costs the broker file handles).
 */
export async function declareHolds(channel: Channel, names: Names, settings: TopologySettings, subscription: string, partition: number): Promise<string> {
  const queue = names.holds(subscription, partition);
  await channel.assertQueue(queue, { durable: true, arguments: queueArguments(settings, { 'x-single-active-consumer': true }) });
  return queue;
}

/**
 * The binding patterns of each partition: with a power-of-two count, one pattern on the low bits of the
 * bucket (`#.1.0` for partition 2 of 4); otherwise every bucket `b` with `b % partitions == p`, one by one.
 */
export function partitionPatterns(partitions: number): Array<[number, string]> {
  const power = Math.log2(partitions);
  if (Number.isInteger(power) && power <= BUCKET_BITS) {
    return Array.from({ length: partitions }, (_, p) => [p, power === 0 ? '#' : `#.${bits(p, power)}`]);
  }
  return Array.from({ length: BUCKETS }, (_, bucket) => [bucket % partitions, bucketKey(bucket)]);
}

/**
 * A delay queue: messages wait `delayMs` (the queue's TTL, so they expire in order at the head), then
 * go back through the return exchange. One queue per delay: a per-message expiration on a shared queue
 * would let a long delay at the head hold back every shorter one behind it.
 */
export async function declareRetryQueue(channel: Channel, names: Names, settings: TopologySettings, subscription: string, delayMs: number): Promise<string> {
  const queue = names.retryQueue(subscription, delayMs);
  await channel.assertQueue(queue, {
    durable: true,
    arguments: queueArguments(settings, {
      'x-message-ttl': delayMs,
      'x-dead-letter-exchange': names.returnExchange(subscription),
      // Quorum queues dead-letter at most once unless told otherwise; a retry must not vanish.
      ...(settings.quorum ? { 'x-dead-letter-strategy': 'at-least-once', 'x-overflow': 'reject-publish' } : {}),
    }),
  });
  return queue;
}

/**
 * Delays are rounded up to a ladder (steps of about 19 %: 2^(1/4)) so that jittered and computed delays
 * share a handful of queues instead of one queue each. A retry waits at most 19 % longer than asked.
 */
export function retryLevel(delayMs: number, minimumMs: number): number {
  const wanted = Math.max(delayMs, minimumMs);
  const step = Math.ceil(Math.log2(wanted / minimumMs) * 4 - 1e-9);
  return Math.round(minimumMs * 2 ** (step / 4));
}
