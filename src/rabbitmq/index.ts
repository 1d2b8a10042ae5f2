/**
 * The RabbitMQ backbone: Tidings' topology on a RabbitMQ server (docs/rabbitmq.md), publisher confirms,
 * per-key order through partition queues with a single active consumer, shared out among a subscription's
 * workers; delayed retries through delay queues, with the keys they hold recorded in the broker; dead-letter
 * queues. With `outbox: postgres(...)`, publishes in a transaction go through the
 * PostgreSQL outbox and a relay, and handlers get a transaction and an inbox (src/outbox).
 */
import type { Consumer, DeliveryHandler, Outgoing, SubscriptionSpec } from '../core/backbone.ts';
import { EVERY_TOPIC } from '../core/backbone.ts';
import type { Broker, DeadLetterStore } from '../core/broker.ts';
import { TidingsError } from '../core/errors.ts';
import { OptionProblems, optionNames } from '../core/options.ts';
import { defaultWarning } from '../core/warnings.ts';
import { brokered, type BrokerBackbone, type RelayOptions } from '../outbox/index.ts';
import type { PostgresBackbone } from '../postgres/index.ts';
import { RabbitConsumer } from './consumer.ts';
import { RabbitDeadLetters } from './dead-letters.ts';
import { Link, redact } from './link.ts';
import { Publisher } from './publisher.ts';
import { Names } from './topology.ts';
import { healthDefaults } from '../telemetry/health.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { HealthCheck } from '../telemetry/status.ts';

export { BUCKETS, CE_PREFIX, routingKey } from './headers.ts';
export { partitionPatterns } from './topology.ts';
export { Names } from './topology.ts';
export { RabbitDeadLetters } from './dead-letters.ts';

export interface RabbitMqOptions {
  /** An AMQP URL: `amqp://user:password@host:5672/vhost`. */
  url: string;
  /** The service's PostgreSQL: publishes in a transaction go through its outbox; handlers get `ctx.tx` and an inbox there. */
  outbox?: PostgresBackbone;
  /** Run the outbox relay in this process (default true when there is an outbox). */
  relay?: boolean | RelayOptions;
  /** Prepended to every exchange and queue name. */
  prefix?: string;
  /** Quorum queues (replicated, count redeliveries); `false` for classic queues. */
  quorum?: boolean;
  /** Unacknowledged messages per partition queue; default `2 × concurrency` of the subscription. */
  prefetch?: number;
  /** How long `open()` (and each tool operation) waits for a connection before BACKBONE_UNAVAILABLE. */
  connectTimeoutMs?: number;
  /** AMQP heartbeat: a dead connection is noticed after about twice this. */
  heartbeatSeconds?: number;
  /** A publish not confirmed within this time (reconnections included) fails with a retryable BACKBONE_UNAVAILABLE. */
  publishTimeoutMs?: number;
  /** Backoff between reconnection attempts. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  /** The shortest delay queue; shorter retry delays wait this long. */
  retryMinMs?: number;
  /** How long past its due time a held key waits for its retried message before later messages go on. */
  retryReturnGraceMs?: number;
  /** How often each worker of a subscription announces itself to the others (they share the partitions). */
  workerHeartbeatMs?: number;
  /** A worker not heard for this long is gone: its partitions go to the others. */
  workerTimeoutMs?: number;
  /**
   * Handled message ids remembered per subscription (in memory, per process) to drop duplicates when the
   * subscription keeps an inbox; the outbox's inbox is the durable de-duplication. 0 turns it off.
   */
  recentIds?: number;
  /** Named in the server's connection list (`rabbitmqctl list_connections name`). */
  connectionName?: string;
  onWarning?: (message: string, error?: unknown) => void;
}

export const rabbitmqDefaults = {
  prefix: 'tidings.',
  quorum: true,
  /** Per partition queue, times the subscription's concurrency. */
  prefetchPerConcurrency: 2,
  connectTimeoutMs: 10_000,
  heartbeatSeconds: 10,
  publishTimeoutMs: 30_000,
  reconnectMinMs: 100,
  reconnectMaxMs: 5_000,
  retryMinMs: 50,
  retryReturnGraceMs: 30_000,
  workerHeartbeatMs: 1_000,
  workerTimeoutMs: 5_000,
  recentIds: 10_000,
  connectionName: 'tidings',
  deadLetterScanLimit: 100_000,
  deadLetterListLimit: 100,
} as const;

type Settings = Required<Omit<RabbitMqOptions, 'outbox' | 'relay' | 'prefetch' | 'onWarning'>> & {
  prefetch: number | undefined;
  warn: (message: string, error?: unknown) => void;
};

/** The broker alone: see `rabbitmq()` for the backbone a bus uses. */
export class RabbitBroker implements Broker {
  readonly name = 'rabbitmq';
  readonly names: Names;
  readonly #settings: Settings;
  readonly #link: Link;
  readonly #publisher: Publisher;
  readonly #deadLetters: RabbitDeadLetters;
  readonly #consumers = new Set<RabbitConsumer>();
  #opening: Promise<void> | undefined;
  #observer: BackboneObserver | undefined;

  constructor(options: RabbitMqOptions) {
    const problems = new OptionProblems('rabbitmq()');
    problems.unknownKeys(options, rabbitmqOptionNames);
    problems.check(
      typeof options?.url === 'string' && /^amqps?:\/\//.test(options.url),
      `url must be an AMQP URL (amqp://user:password@host:5672), got ${JSON.stringify(typeof options?.url === 'string' ? redact(options.url) : options?.url)}`,
    );
    problems.check(
      options.prefix === undefined || (typeof options.prefix === 'string' && !options.prefix.includes(':') && options.prefix.length <= 100),
      'prefix must be a string of at most 100 characters without ":"',
    );
    problems.oneOf('quorum', options.quorum, [true, false]);
    problems.integer('prefetch', options.prefetch, 1, 65_535);
    problems.integer('connectTimeoutMs', options.connectTimeoutMs, 100);
    problems.integer('heartbeatSeconds', options.heartbeatSeconds, 0, 3_600);
    problems.integer('publishTimeoutMs', options.publishTimeoutMs, 100);
    problems.integer('reconnectMinMs', options.reconnectMinMs, 1);
    problems.integer('reconnectMaxMs', options.reconnectMaxMs, 1);
    problems.integer('retryMinMs', options.retryMinMs, 1, 60_000);
    problems.integer('retryReturnGraceMs', options.retryReturnGraceMs, 0);
    problems.integer('workerHeartbeatMs', options.workerHeartbeatMs, 10);
    problems.integer('workerTimeoutMs', options.workerTimeoutMs, 100);
    const beat = options.workerHeartbeatMs ?? rabbitmqDefaults.workerHeartbeatMs;
    const timeout = options.workerTimeoutMs ?? rabbitmqDefaults.workerTimeoutMs;
    problems.check(
      beat * 2 <= timeout,
      `workerHeartbeatMs (${beat}) must be at most half of workerTimeoutMs (${timeout}), or live workers are taken for gone between heartbeats`,
    );
    problems.integer('recentIds', options.recentIds, 0, 10_000_000);
    problems.check(options.onWarning === undefined || typeof options.onWarning === 'function', 'onWarning must be a function');
    problems.throwIfAny();
    const d = rabbitmqDefaults;
    this.#settings = {
      url: options.url,
      prefix: options.prefix ?? d.prefix,
      quorum: options.quorum ?? d.quorum,
      prefetch: options.prefetch,
      connectTimeoutMs: options.connectTimeoutMs ?? d.connectTimeoutMs,
      heartbeatSeconds: options.heartbeatSeconds ?? d.heartbeatSeconds,
      publishTimeoutMs: options.publishTimeoutMs ?? d.publishTimeoutMs,
      reconnectMinMs: options.reconnectMinMs ?? d.reconnectMinMs,
      reconnectMaxMs: Math.max(options.reconnectMaxMs ?? d.reconnectMaxMs, options.reconnectMinMs ?? d.reconnectMinMs),
      retryMinMs: options.retryMinMs ?? d.retryMinMs,
      retryReturnGraceMs: options.retryReturnGraceMs ?? d.retryReturnGraceMs,
      workerHeartbeatMs: options.workerHeartbeatMs ?? d.workerHeartbeatMs,
      workerTimeoutMs: options.workerTimeoutMs ?? d.workerTimeoutMs,
      recentIds: options.recentIds ?? d.recentIds,
      connectionName: options.connectionName ?? d.connectionName,
      warn: options.onWarning ?? defaultWarning,
    };
    const s = this.#settings;
    this.names = new Names(s.prefix);
    this.#link = new Link({
      ...s,
      connectionName: s.connectionName,
      connection: (lost) =>
        this.#observer?.emit(lost ? 'connection:lost' : 'connection:restored', { backbone: 'rabbitmq', detail: `RabbitMQ at ${redact(s.url)}` }),
    });
    this.#publisher = new Publisher(this.#link, this.names, s);
    this.#deadLetters = new RabbitDeadLetters(this.#link, this.names, {
      quorum: s.quorum,
      scanLimit: d.deadLetterScanLimit,
      listLimit: d.deadLetterListLimit,
      connectTimeoutMs: s.connectTimeoutMs,
    });
  }

  observe(observer: BackboneObserver): void {
    this.#observer = observer;
  }

  /** Reachable: a connection is open, or one opens within the health check's time (asking for it starts a reconnect). */
  async health(): Promise<readonly HealthCheck[]> {
    const where = `RabbitMQ at ${redact(this.#settings.url)}`;
    try {
      // Half the check's time: the answer, either way, must come before the bus gives up on the check.
      await this.#link.connection(Date.now() + healthDefaults.timeoutMs / 2);
      return [{ name: 'broker', ok: true, detail: `connected to ${where}` }];
    } catch (error) {
      return [{ name: 'broker', ok: false, detail: `${where} is unreachable: ${(error as Error).message}` }];
    }
  }

  /** Connects (within `connectTimeoutMs`, else a retryable BACKBONE_UNAVAILABLE). Queues are declared per subscription. */
  open(): Promise<void> {
    this.#opening ??= this.#link.connection(Date.now() + this.#settings.connectTimeoutMs).then(() => undefined);
    this.#opening.catch(() => {
      this.#opening = undefined;
    });
    return this.#opening;
  }

  async publish(messages: readonly Outgoing[]): Promise<void> {
    if (this.#link.closed) throw new TidingsError('STOPPED', 'The RabbitMQ backbone is closed');
    return this.#publisher.publish(messages);
  }

  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<undefined>): Promise<Consumer> {
    if (spec.topics.includes(EVERY_TOPIC)) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Subscription ${spec.name}: RabbitMQ subscriptions name their topics; "every topic" is for the outbox relay on PostgreSQL`,
      );
    }
    await this.open();
    const deadline = Date.now() + this.#settings.connectTimeoutMs;
    await this.#checkPartitions(spec, deadline);
    const consumer = new RabbitConsumer(spec, handle, this.#link, this.names, {
      prefix: this.#settings.prefix,
      quorum: this.#settings.quorum,
      prefetch: this.#settings.prefetch ?? Math.min(65_535, spec.concurrency * rabbitmqDefaults.prefetchPerConcurrency),
      retryMinMs: this.#settings.retryMinMs,
      retryReturnGraceMs: this.#settings.retryReturnGraceMs,
      reconnectMinMs: this.#settings.reconnectMinMs,
      reconnectMaxMs: this.#settings.reconnectMaxMs,
      connectTimeoutMs: this.#settings.connectTimeoutMs,
      workerHeartbeatMs: this.#settings.workerHeartbeatMs,
      workerTimeoutMs: this.#settings.workerTimeoutMs,
      connectionName: this.#settings.connectionName,
      warn: this.#settings.warn,
      register: (subscription) => this.#deadLetters.register(subscription),
      recentIds: this.#settings.recentIds,
    });
    await consumer.start(deadline);
    this.#consumers.add(consumer);
    return {
      stop: async () => {
        await consumer.stop();
        this.#consumers.delete(consumer);
      },
    };
  }

  /**
   * A subscription's partition count is fixed once its queues exist: with another count, buckets would be
   * bound to two partition queues (one of them unread). Queue `p<partitions>` existing means it shrank;
   * `p0` existing without `p<partitions - 1>` means it grew.
   */
  async #checkPartitions(spec: SubscriptionSpec, deadline: number): Promise<void> {
    const exists = async (queue: string): Promise<boolean> => {
      const channel = await this.#link.confirmChannel(deadline);
      try {
        await channel.checkQueue(queue);
        return true;
      } catch (error) {
        if ((error as { code?: unknown }).code === 404) return false;
        throw error;
      } finally {
        await channel.close().catch(() => undefined);
      }
    };
    const [first, last, beyond] = await Promise.all([
      exists(this.names.partition(spec.name, 0)),
      exists(this.names.partition(spec.name, spec.partitions - 1)),
      exists(this.names.partition(spec.name, spec.partitions)),
    ]);
    if (beyond || (first && !last)) {
      throw new TidingsError(
        'SUBSCRIPTION_CONFLICT',
        `Subscription ${spec.name} exists in RabbitMQ with a different partition count than ${spec.partitions} (queues ${this.names.partition(spec.name, 0)}...); keep its count, or use a new subscription name`,
      );
    }
  }

  deadLetters(): DeadLetterStore {
    return this.#deadLetters;
  }

  async close(): Promise<void> {
    await Promise.all([...this.#consumers].map((consumer) => consumer.stop()));
    await this.#publisher.close();
    await this.#link.close();
  }
}

const rabbitmqOptionNames = optionNames<RabbitMqOptions>()(
  'url',
  'outbox',
  'relay',
  'prefix',
  'quorum',
  'prefetch',
  'connectTimeoutMs',
  'heartbeatSeconds',
  'publishTimeoutMs',
  'reconnectMinMs',
  'reconnectMaxMs',
  'retryMinMs',
  'retryReturnGraceMs',
  'recentIds',
  'workerHeartbeatMs',
  'workerTimeoutMs',
  'connectionName',
  'onWarning',
);

export interface RabbitMqBackboneOptions extends RabbitMqOptions {}

/**
 * The RabbitMQ backbone for `createBus`: `rabbitmq({ url, outbox: postgres({ url: DATABASE_URL }) })`.
 * Without an outbox, standalone publishes and consumers work, but not `bus.transaction` or `ctx.tx`.
 */
export function rabbitmq(options: RabbitMqBackboneOptions): BrokerBackbone {
  const { outbox, relay, onWarning } = options;
  return brokered(new RabbitBroker(options), { outbox, relay, onWarning });
}
