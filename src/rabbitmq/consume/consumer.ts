/**
 * One subscription's consumer in one process: a worker among the subscription's workers (workers.ts), and
 * a reader for each partition it is given (reader.ts).
 *
 * Sharing. Every worker announces itself and the topics it handles; the partitions are shared out among the
 * workers that handle every topic, about partitions / workers each, and shared out again when a worker joins
 * or leaves (a stop announces it; a crash is noticed after `workerTimeoutMs`). A partition changes hands
 * gracefully: its reader finishes what runs, then closes its channel, which returns the rest to the head of
 * the queue for the next reader, and the next reader picks up the partition's holds (holds.ts). Each
 * partition queue keeps a single active consumer, so even two workers that disagree for a moment about who
 * reads a partition never read it at the same time. (Tests: workers.rabbitmq.)
 */
import type { Consumer, DeliveryHandler, SubscriptionSpec } from '../../core/backbone.ts';
import type { Link } from '../connection.ts';
import { RecentIds, Slots } from './slots.ts';
import { declareSubscription, type Names } from '../topology.ts';
import { Workers } from './workers.ts';
import { PartitionReader } from './reader.ts';
import type { ReaderHost, ReaderSettings, Unhandled } from './state.ts';
import type { ConsumedSubscription, ReaderFacts } from '../observe.ts';

interface ConsumerSettings extends ReaderSettings {
  /** How often a worker announces itself to the subscription's other workers. */
  readonly workerHeartbeatMs: number;
  readonly connectionName: string;
  readonly register: (subscription: string) => Promise<void>;
  /** Handled ids remembered to drop duplicates when the subscription keeps an inbox (RecentIds); 0: off. */
  readonly recentIds: number;
}

export class RabbitConsumer implements Consumer, ReaderHost, ConsumedSubscription {
  readonly spec: SubscriptionSpec;
  readonly handle: DeliveryHandler<undefined>;
  readonly link: Link;
  readonly names: Names;
  readonly settings: ConsumerSettings;
  readonly slots: Slots;
  readonly recent: RecentIds;
  readonly workers: Workers;
  readonly #readers: PartitionReader[];
  /** Since when a topic nobody handles has been met (see `unhandled`). */
  readonly #unhandledSince = new Map<string, number>();
  /** Topics no longer the subscription's whose messages it has been told it skips. */
  readonly #skipping = new Set<string>();
  #sweeper: NodeJS.Timeout | undefined;
  #stopping = false;
  #stopped: Promise<void> | undefined;

  constructor(spec: SubscriptionSpec, handle: DeliveryHandler<undefined>, link: Link, names: Names, settings: ConsumerSettings) {
    this.spec = spec;
    this.handle = handle;
    this.link = link;
    this.names = names;
    this.settings = settings;
    this.slots = new Slots(spec.concurrency);
    this.recent = new RecentIds(settings.recentIds);
    this.workers = new Workers(
      link,
      names,
      { name: spec.name, topics: spec.topics, onChange: () => this.#share() },
      {
        heartbeatMs: settings.workerHeartbeatMs,
        timeoutMs: settings.workerTimeoutMs,
        reconnectMinMs: settings.reconnectMinMs,
        reconnectMaxMs: settings.reconnectMaxMs,
        connectionName: settings.connectionName,
        warn: settings.warn,
      },
    );
    this.#readers = Array.from({ length: spec.partitions }, (_, index) => new PartitionReader(this, index));
  }

  /**
   * Declares the topology (every partition: one nobody reads still receives its messages), joins the
   * subscription's workers and starts reading the partitions this worker is given; resolves once it does.
   */
  async start(deadline: number): Promise<void> {
    const channel = await this.link.confirmChannel(deadline);
    try {
      await declareSubscription(channel, this.names, this.settings, this.spec);
    } finally {
      // Not awaited: the next steps need not wait for the close's round trip.
      channel.close().catch(() => undefined);
    }
    await this.settings.register(this.spec.name);
    await this.workers.start(deadline);
    // Declared just now: the first channel of each reader given a partition now goes straight to consuming.
    for (const reader of this.#readers) reader.justDeclared(true);
    this.#sweeper = setInterval(() => {
      for (const reader of this.#readers) reader.sweep();
    }, 250);
    this.#sweeper.unref();
    await Promise.all(this.#share());
    // A partition given to this worker later, or a channel opened again, declares its queue first.
    for (const reader of this.#readers) reader.justDeclared(false);
  }

  get name(): string {
    return this.spec.name;
  }

  /** What each partition's reader holds, for the gauges (observe.ts). */
  facts(): ReaderFacts[] {
    return this.#readers.map((reader) => reader.facts());
  }

  /** Reads the partitions this worker is given now, lets go of the others. */
  #share(): Promise<void>[] {
    if (this.#stopping) return [];
    const mine = new Set(this.workers.assigned(this.spec.partitions));
    return this.#readers.map((reader) => (mine.has(reader.index) ? reader.acquire() : reader.release()));
  }

  /**
   * A message of `topic`, which this worker has no handler for, heads its lane in `partition`.
   *
   * If the topic is the subscription's (a live worker or the newest one handles it), this worker should not
   * read the partition (the workers' views differ for a moment): it hands it over, the message unacknowledged.
   * If it is not, it may be that a worker with the handler is starting and not heard yet: the partition is
   * held back until the topic has been unknown for a whole worker timeout. After that the message is not
   * the subscription's: one that came straight from the topic's exchange (through a binding left by a
   * worker that had the handler) is acknowledged unhandled, as PostgreSQL moves past it; one that came
   * another way (a foreign producer's wrong topic header, a redrive) is dead-lettered with the reason.
   */
  unhandled(partition: number, topic: string, id: string, fromItsExchange: boolean): Unhandled {
    const queue = this.names.partition(this.spec.name, partition);
    const self = this.workers.self;
    const now = Date.now();
    if (this.workers.topics().includes(topic)) {
      this.#unhandledSince.delete(topic);
      const handling = this.workers.handling(topic);
      const who =
        handling.length > 0
          ? `${handling.map((w) => w.name).join(', ')} ${handling.length === 1 ? 'has' : 'have'} one`
          : `the newest worker, ${this.workers.departedNewest?.name}, had one`;
      this.settings.warn(
        `Subscription ${this.spec.name}: message ${id} in ${queue} is of topic ${topic}, which this worker (${self.name}) has no handler for and ${who}: the partition goes back to its queue, the message unacknowledged`,
      );
      return { action: 'hand-over', pauseMs: this.settings.workerHeartbeatMs };
    }
    const since = this.#unhandledSince.get(topic) ?? now;
    this.#unhandledSince.set(topic, since);
    const waitMs = since + this.settings.workerTimeoutMs - now;
    if (waitMs > 0 || !this.workers.settled) {
      if (since === now) {
        this.settings.warn(
          `Subscription ${this.spec.name}: message ${id} in ${queue} is of topic ${topic}, which no worker of the subscription has a handler for; the partition waits ${this.settings.workerTimeoutMs} ms for one to be heard of, the message unacknowledged`,
        );
      }
      return { action: 'hand-over', pauseMs: Math.max(Math.min(waitMs, this.settings.workerHeartbeatMs), this.settings.reconnectMinMs) };
    }
    if (fromItsExchange) {
      if (!this.#skipping.has(topic)) {
        this.#skipping.add(topic);
        this.settings.warn(
          `Subscription ${this.spec.name}: topic ${topic} is no longer the subscription's (no worker handles it, nor did the newest): its messages that still reach ${this.names.partition(this.spec.name, 0).replace(/p0$/, 'p*')} through the binding to exchange ${this.names.exchange(topic)} are acknowledged unhandled; remove that binding if the topic is still published`,
        );
      }
      return { action: 'skip' };
    }
    const workers = this.workers
      .live()
      .map((w) => `${w.name} (${w.topics.join(', ')})`)
      .join('; ');
    return {
      action: 'dead-letter',
      reason: `no worker of subscription ${this.spec.name} has a handler for topic ${topic} (workers: ${workers}) of message ${id}`,
    };
  }

  /**
   * Graceful: says goodbye first (the other workers get ready to take the partitions), then each reader
   * finishes what runs and hands its partition back.
   */
  stop(): Promise<void> {
    this.#stopped ??= (async () => {
      this.#stopping = true;
      this.workers.leave();
      clearInterval(this.#sweeper);
      await Promise.all(this.#readers.map((reader) => reader.release()));
      await this.workers.close();
    })();
    return this.#stopped;
  }
}
