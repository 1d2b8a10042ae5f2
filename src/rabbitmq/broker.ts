/** The RabbitMQ broker: the connection, publishing with confirms, a consumer per subscription, dead letters. */
import type { Consumer, DeliveryHandler, Outgoing, SubscriptionSpec } from '../core/backbone.ts';
import { EVERY_TOPIC, fairSharesIgnored } from '../core/backbone.ts';
import type { Broker } from '../core/broker.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import type { BackboneDescription } from '../core/catalog.ts';
import { TidingsError } from '../core/errors.ts';
import { Link, redact } from './connection.ts';
import { RabbitConsumer } from './consume/consumer.ts';
import { RabbitDeadLetters } from './dead-letters.ts';
import { rabbitmqDefaults, resolveRabbitMqSettings, type RabbitMqOptions, type RabbitMqSettings } from './options.ts';
import { CommandOwners } from './owners.ts';
import { Publisher } from './publisher.ts';
import { Names } from './topology.ts';
import { healthDefaults } from '../telemetry/health.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { BackboneStatus, HealthCheck } from '../telemetry/status.ts';
import { rabbitStatus } from './observe.ts';

/** The broker alone: see `rabbitmq()` for the backbone a bus uses. */
export class RabbitBroker implements Broker {
  readonly name = 'rabbitmq';
  readonly names: Names;
  readonly #settings: RabbitMqSettings;
  readonly #link: Link;
  readonly #publisher: Publisher;
  readonly #deadLetters: RabbitDeadLetters;
  readonly #owners: CommandOwners;
  readonly #consumers = new Set<RabbitConsumer>();
  #opening: Promise<void> | undefined;
  #observer: BackboneObserver | undefined;

  constructor(options: RabbitMqOptions) {
    this.#settings = resolveRabbitMqSettings(options);
    const s = this.#settings;
    this.names = new Names(s.prefix);
    this.#link = new Link({
      ...s,
      connectionName: s.connectionName,
      connection: (lost) =>
        this.#observer?.emit(lost ? 'connection:lost' : 'connection:restored', { backbone: 'rabbitmq', detail: `RabbitMQ at ${redact(s.url)}` }),
    });
    this.#publisher = new Publisher(this.#link, this.names, s);
    this.#owners = new CommandOwners(this.#link, this.names);
    this.#deadLetters = new RabbitDeadLetters(this.#link, this.names, {
      quorum: s.quorum,
      scanLimit: rabbitmqDefaults.deadLetterScanLimit,
      listLimit: rabbitmqDefaults.deadLetterListLimit,
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

  /** The subscriptions this process consumes: lag, held keys, dead letters (observe.ts says what RabbitMQ can tell). */
  status(): Promise<BackboneStatus> {
    return rabbitStatus(this.#link, this.names, this.#consumers, Date.now() + healthDefaults.timeoutMs);
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
    const ignored = fairSharesIgnored(spec, 'RabbitMQ', 'a vhost');
    if (ignored !== undefined) this.#settings.warn(ignored);
    await this.open();
    const deadline = Date.now() + this.#settings.connectTimeoutMs;
    await this.#checkPartitions(spec, deadline);
    await this.#owners.claim(spec, deadline);
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
      observer: () => this.#observer,
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
    const exists = (queue: string) => this.#link.queueExists(queue, deadline);
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

  describe(): BackboneDescription {
    return { name: this.name, settings: { prefix: this.#settings.prefix } };
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
