/**
 * What the RabbitMQ backbone reports to the bus's telemetry (src/telemetry): its subscriptions' status, for
 * the metrics' gauges. Read from what any AMQP client is told (a queue's ready messages, in the answer to
 * queue.declare) and from what this process holds. RabbitMQ does not tell an AMQP client how many messages
 * are delivered to others and not yet acknowledged, nor how old a queue's messages are (its management
 * plugin's HTTP API does), so:
 *
 * - lag, per partition: the messages ready in the partition queue, plus those this process holds of it
 *   (delivered and not acknowledged, or waiting in a delay queue for their retry);
 * - oldest unhandled age: only for the partitions this process reads (the oldest message it holds);
 * - held keys: the keys of the partitions this process reads that wait for a delayed retry, plus the hold
 *   records waiting in the holds queues of partitions no process reads;
 * - dead letters: the messages in the subscription's dead-letter queue.
 *
 * Proven by test/metrics.brokers.test.ts, which parses them from `tidings/metrics`.
 */
import type { ConfirmChannel } from 'amqplib';
import type { BackboneStatus, PartitionState, SubscriptionState } from '../telemetry/status.ts';
import type { Link } from './connection.ts';
import type { Names } from './topology.ts';

/** What one partition reader holds of its partition (PartitionReader.facts). */
export interface ReaderFacts {
  readonly partition: number;
  /** It is the partition's active consumer (or taking it over). */
  readonly reading: boolean;
  /** Messages it holds that are not handled yet: delivered, running, or away in a delay queue. */
  readonly unhandled: number;
  /** Keys whose head waits in a delay queue for its retry. */
  readonly heldKeys: number;
  /** Publication time (epoch ms) of the oldest message it holds; null when it holds none, undefined when it cannot tell. */
  readonly oldestTime: number | null | undefined;
}

/** A subscription consumed by this process: its name and its readers' facts. */
export interface ConsumedSubscription {
  readonly name: string;
  facts(): readonly ReaderFacts[];
}

export async function rabbitStatus(link: Link, names: Names, consumed: Iterable<ConsumedSubscription>, deadline: number): Promise<BackboneStatus> {
  const subscriptions: SubscriptionState[] = [];
  const counts = new QueueCounts(link, deadline);
  try {
    for (const subscription of consumed) subscriptions.push(await subscriptionState(subscription, names, counts));
  } finally {
    await counts.close();
  }
  return { subscriptions };
}

async function subscriptionState(subscription: ConsumedSubscription, names: Names, counts: QueueCounts): Promise<SubscriptionState> {
  const now = Date.now();
  const facts = subscription.facts();
  const [ready, deadLetters] = await Promise.all([
    counts.ready(facts.map((fact) => names.partition(subscription.name, fact.partition))),
    counts.ready([names.deadQueue(subscription.name)]),
  ]);
  let heldKeys = 0;
  const partitions: PartitionState[] = [];
  for (const [index, fact] of facts.entries()) {
    const waiting = ready[index] ?? 0;
    // A holds queue exists once its partition first held a key; its records are consumed (unacknowledged, so
    // not counted ready) by the partition's reader, which knows the held keys itself.
    heldKeys += fact.reading ? fact.heldKeys : await counts.readyIfExists(names.holds(subscription.name, fact.partition));
    partitions.push({
      partition: fact.partition,
      lag: waiting + fact.unhandled,
      oldestUnhandledAgeMs: oldestAge(fact, waiting, now),
    });
  }
  const ages = partitions.map((partition) => partition.oldestUnhandledAgeMs).filter((age): age is number => typeof age === 'number');
  return {
    name: subscription.name,
    lag: partitions.reduce((sum, partition) => sum + partition.lag, 0),
    // Of the partitions this process reads: the others' are not known here.
    oldestUnhandledAgeMs: ages.length > 0 ? Math.max(...ages) : undefined,
    heldKeys,
    deadLetters: deadLetters[0] ?? 0,
    partitions,
  };
}

/** Known only for a partition this process reads: the oldest it holds, else none if nothing is ready either. */
function oldestAge(fact: ReaderFacts, ready: number, now: number): number | null | undefined {
  if (!fact.reading || fact.oldestTime === undefined) return undefined;
  if (fact.oldestTime !== null) return Math.max(0, now - fact.oldestTime);
  return ready === 0 ? null : undefined;
}

/** Ready counts of queues, read on one channel while the queues exist (a missing one closes the channel that asked). */
class QueueCounts {
  readonly #link: Link;
  readonly #deadline: number;
  #channel: Promise<ConfirmChannel> | undefined;

  constructor(link: Link, deadline: number) {
    this.#link = link;
    this.#deadline = deadline;
  }

  /** Queues the subscription declared when it started; in one burst (amqplib queues the calls on the channel). */
  async ready(queues: readonly string[]): Promise<number[]> {
    const channel = await this.#open();
    return Promise.all(queues.map(async (queue) => (await channel.checkQueue(queue)).messageCount));
  }

  /** A queue that may not exist: 0 if it does not. */
  async readyIfExists(queue: string): Promise<number> {
    const channel = await this.#open();
    try {
      return (await channel.checkQueue(queue)).messageCount;
    } catch (error) {
      if ((error as { code?: unknown }).code !== 404) throw error;
      this.#channel = undefined;
      return 0;
    }
  }

  #open(): Promise<ConfirmChannel> {
    this.#channel ??= this.#link.confirmChannel(this.#deadline);
    return this.#channel;
  }

  async close(): Promise<void> {
    const channel = await this.#channel?.catch(() => undefined);
    await channel?.close().catch(() => undefined);
  }
}
