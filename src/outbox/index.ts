/**
 * A broker made into a backbone. Publishing inside a database transaction writes to a PostgreSQL outbox (the
 * postgres backbone's log, in the caller's transaction); a relay, itself an ordered subscription on that
 * log, moves committed messages to the broker, at least once and in per-key order. Handlers get a database
 * transaction (opened on first use) that commits together with their inbox record, so their writes happen
 * once although the broker may deliver twice. Without an outbox the broker is used alone: no `tx`, no inbox.
 */
import { defaultWarning } from '../core/warnings.ts';
import type { Backbone, Consumer, Delivery, DeliveryHandler, DeliveryResult, Outgoing, Reply, SubscriptionSpec } from '../core/backbone.ts';
import { EVERY_TOPIC } from '../core/backbone.ts';
import type { Broker } from '../core/broker.ts';
import type { SagaStore } from '../core/saga.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import { keyHash, type Envelope } from '../core/envelope.ts';
import { describeError, storable, TidingsError } from '../core/errors.ts';
import { envelopeProblem } from '../core/limits.ts';
import { OptionProblems, optionNames, quotaProblems, resolveQuotas, type QuotaOptions } from '../core/options.ts';
import { LocalTokenBuckets, TenantQuotas } from '../core/quotas.ts';
import type { AnyContract } from '../core/contract.ts';
import { sleep } from '../core/sleep.ts';
import type { Inbox } from '../postgres/inbox.ts';
import type { PostgresBackbone } from '../postgres/backbone.ts';
import type { PgTransaction } from '../postgres/transaction.ts';
import type { BackboneDescription, ContractRegistry } from '../core/catalog.ts';
import type { BackboneStatus, HealthCheck } from '../telemetry/status.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';

export interface RelayOptions {
  /** Ordered lanes of the relay subscription; processes running the relay share them. */
  partitions?: number;
  /** Messages being handed to the broker at once, per process (different keys only). */
  concurrency?: number;
  batchSize?: number;
}

export interface BrokeredOptions {
  /**
   * The PostgreSQL database of this service: `publish(..., { tx })` writes there and the relay carries it to
   * the broker; handlers get `ctx.tx` and an inbox there. Without it, only standalone publishes work.
   */
  outbox?: PostgresBackbone | undefined;
  /** Runs the relay in this process (default true). Turn it off in processes that only consume. */
  relay?: boolean | RelayOptions | undefined;
  onWarning?: ((message: string, error?: unknown) => void) | undefined;
  /**
   * Per-tenant publish rates (docs/tenancy.md, "Quotas"): with an outbox, one budget per tenant for every
   * process, kept in its database; without one, a budget per process. Without them here, the outbox's own
   * `tenancy.quotas` apply, if it has them.
   */
  tenancy?: { quotas?: QuotaOptions | undefined } | undefined;
}

export const relayDefaults = {
  /** The relay's subscription on the outbox log. */
  subscription: 'tidings-relay',
  partitions: 4,
  concurrency: 64,
  batchSize: 500,
  /** Backoff while the broker refuses or cannot be reached; the message stays in line meanwhile. */
  retryMinMs: 100,
  retryMaxMs: 5_000,
} as const;

/** How long a delivery waits after the outbox database failed it, before the broker redelivers. */
const databaseRetryMs = 1_000;

export class BrokerBackbone implements Backbone<PgTransaction> {
  readonly name: string;
  readonly broker: Broker;
  readonly outbox: PostgresBackbone | undefined;
  readonly #relayOptions: Required<RelayOptions> | undefined;
  readonly #warn: (message: string, error?: unknown) => void;
  readonly #stopping = new AbortController();
  readonly #quotas: TenantQuotas | undefined;
  #relay: Consumer | undefined;
  #observer: BackboneObserver | undefined;
  #closing: Promise<void> | undefined;
  #opening: Promise<void> | undefined;

  constructor(broker: Broker, options: BrokeredOptions = {}) {
    const problems = new OptionProblems(`${broker.name}()`);
    problems.unknownKeys(options, optionNames<BrokeredOptions>()('outbox', 'relay', 'onWarning', 'tenancy'));
    problems.unknownKeys(options.tenancy, ['quotas'], 'tenancy.');
    quotaProblems(problems, options.tenancy?.quotas, 'tenancy.quotas.');
    const relay = typeof options.relay === 'object' ? options.relay : {};
    problems.unknownKeys(relay, optionNames<RelayOptions>()('partitions', 'concurrency', 'batchSize'), 'relay.');
    problems.integer('relay.partitions', relay.partitions, 1, 1_024);
    problems.integer('relay.concurrency', relay.concurrency, 1, 10_000);
    problems.integer('relay.batchSize', relay.batchSize, 1, 100_000);
    problems.check(
      options.outbox === undefined || typeof options.outbox.transaction === 'function',
      'outbox must be a postgres backbone, for example postgres({ url: process.env.DATABASE_URL })',
    );
    problems.throwIfAny();
    this.name = broker.name;
    this.broker = broker;
    this.outbox = options.outbox;
    this.#relayOptions =
      options.outbox === undefined || options.relay === false
        ? undefined
        : {
            partitions: relay.partitions ?? relayDefaults.partitions,
            concurrency: relay.concurrency ?? relayDefaults.concurrency,
            batchSize: relay.batchSize ?? relayDefaults.batchSize,
          };
    this.#warn = options.onWarning ?? defaultWarning;
    const quotas = options.tenancy?.quotas;
    this.#quotas = quotas === undefined ? undefined : new TenantQuotas(resolveQuotas(quotas), options.outbox?.tokenBuckets() ?? new LocalTokenBuckets());
  }

  open(): Promise<void> {
    this.#opening ??= this.#open();
    return this.#opening;
  }

  async #open(): Promise<void> {
    await Promise.all([this.broker.open(), this.outbox?.open()]);
    const relay = this.#relayOptions;
    if (this.outbox === undefined || relay === undefined) return;
    this.#relay = await this.outbox.consume(
      {
        name: relayDefaults.subscription,
        topics: [EVERY_TOPIC],
        partitions: relay.partitions,
        concurrency: relay.concurrency,
        batchSize: relay.batchSize,
        inbox: false,
        // What the outbox holds from before this process first relayed still has to reach the broker.
        startFrom: 'beginning',
      },
      (delivery) => this.#forward(delivery),
    );
  }

  observe(observer: BackboneObserver): void {
    this.#observer = observer;
    this.broker.observe?.(observer);
    this.outbox?.observe(observer);
  }

  /** Hands one outbox message to the broker, in its relay span; waits out a broker outage rather than giving up on it. */
  async #forward(delivery: Delivery<PgTransaction>): Promise<DeliveryResult> {
    const span = this.#observer?.relay(delivery.envelope, this.broker.name);
    const result = await this.#hand(span?.headers === undefined ? delivery.envelope : { ...delivery.envelope, ...span.headers });
    span?.end(result.outcome === 'ack' ? undefined : result.error);
    return result;
  }

  /** `envelope` with the relay span's traceparent, so the consumers' spans are its children. */
  async #hand(envelope: Envelope): Promise<DeliveryResult> {
    // What the outbox holds was checked at publish, unless an older version or raw SQL wrote it.
    let outgoing: Outgoing;
    try {
      const problem = envelopeProblem(envelope);
      if (problem !== undefined) throw new TidingsError('LIMIT_EXCEEDED', problem, { ref: { topic: envelope.topic } });
      outgoing = toOutgoing(envelope);
    } catch (error) {
      const reason = `Relay cannot hand message ${storable(String(envelope.id), 300)} (${envelope.topic}) to ${this.broker.name}: ${(error as Error).message}`;
      this.#warn(`${reason}; it is in the outbox's dead letters (subscription ${relayDefaults.subscription})`);
      return { outcome: 'dead-letter', reason, error: describeError(error) };
    }
    for (let waitMs: number = relayDefaults.retryMinMs; ; waitMs = Math.min(waitMs * 2, relayDefaults.retryMaxMs)) {
      try {
        await this.broker.publish([outgoing]);
        return { outcome: 'ack' };
      } catch (error) {
        // A message this broker can never take (an id over AMQP's 255 bytes, a message over the server's
        // limit) is set aside, so the messages behind it flow; see test/relay.brokers.test.ts.
        if (error instanceof TidingsError && !error.retryable) {
          const reason = `${this.broker.name} refused message ${outgoing.envelope.id} (${outgoing.envelope.topic}) for good: ${error.message}`;
          this.#warn(`Relay: ${reason}; it is in the outbox's dead letters (subscription ${relayDefaults.subscription})`);
          return { outcome: 'dead-letter', reason, error: describeError(error) };
        }
        if (this.#stopping.signal.aborted) return { outcome: 'retry', delayMs: 0, error: describeError(error) };
        this.#warn(`Relay could not hand message ${outgoing.envelope.id} (${outgoing.envelope.topic}) to ${this.broker.name}; retrying in ${waitMs} ms`, error);
        await sleep(waitMs, this.#stopping.signal);
      }
    }
  }

  async publish(messages: readonly Outgoing[], tx?: PgTransaction): Promise<void> {
    await this.open();
    // The broker cannot hold a message until it is due: the outbox does, and the relay carries it then.
    if (messages.some((message) => message.dueAt !== undefined)) {
      if (this.outbox === undefined) throw noOutbox(this.name, 'schedule delivery');
      return this.outbox.publish(messages, tx);
    }
    if (tx === undefined) return this.broker.publish(messages);
    if (this.outbox === undefined) throw noOutbox(this.name, 'publish in a transaction');
    return this.outbox.publish(messages, tx);
  }

  async admit(tenant: string, contract: AnyContract, count: number, tx?: PgTransaction): Promise<void> {
    if (this.#quotas === undefined) return this.outbox?.admit(tenant, contract, count, tx);
    await this.open();
    return this.#quotas.admit(tenant, contract, count, tx);
  }

  async claimTick(name: string, definition: string, tick: number, tx: PgTransaction): Promise<boolean> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'run recurring schedules');
    return this.outbox.claimTick(name, definition, tick, tx);
  }

  async lastTick(name: string): Promise<{ tick: number; definition: string } | undefined> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'run recurring schedules');
    await this.open();
    return this.outbox.lastTick(name);
  }

  /** The registry of the outbox database if there is one, else the broker's (NATS KV); RabbitMQ alone has none. */
  contracts(): ContractRegistry | undefined {
    return this.outbox?.contracts() ?? this.broker.contracts?.();
  }

  describe(): BackboneDescription {
    return this.broker.describe?.() ?? { name: this.name };
  }

  sagas(): SagaStore<PgTransaction> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'keep saga state');
    return this.outbox.sagas();
  }

  async reply(requestId: string, reply: Reply, tx?: PgTransaction): Promise<void> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'carry replies');
    await this.open();
    return this.outbox.reply(requestId, reply, tx);
  }

  async awaitReply(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'carry replies');
    await this.open();
    return this.outbox.awaitReply(requestId, signal, late);
  }

  async cancelScheduled(id: string): Promise<boolean> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'schedule delivery');
    await this.open();
    return this.outbox.cancelScheduled(id);
  }

  async transaction<T>(fn: (tx: PgTransaction) => Promise<T>): Promise<T> {
    if (this.outbox === undefined) throw noOutbox(this.name, 'run a transaction');
    await this.open();
    return this.outbox.transaction(fn);
  }

  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<PgTransaction>): Promise<Consumer> {
    await this.open();
    const outbox = this.outbox;
    if (outbox === undefined) return this.broker.consume(spec, (delivery) => handle(delivery as Delivery<never>));
    const inbox = spec.inbox ? outbox.inbox(spec.name) : undefined;
    return this.broker.consume(spec, (delivery) => this.#withOutbox(outbox, spec, inbox, delivery, handle));
  }

  /**
   * One attempt with the outbox database (see postgres/lazy-transaction.ts): a message the inbox already has is acknowledged
   * unhandled; `ctx.tx`, if the handler uses it, is a transaction that records the message in the inbox
   * before the handler's writes and commits with them; a handler that never used it has its message
   * recorded by an insert shared with concurrent deliveries. The broker is acknowledged only after that.
   */
  async #withOutbox(
    outbox: PostgresBackbone,
    spec: SubscriptionSpec,
    inbox: Inbox | undefined,
    delivery: Delivery<undefined>,
    handle: DeliveryHandler<PgTransaction>,
  ): Promise<DeliveryResult> {
    const id = delivery.envelope.id;
    const databaseFailed = (error: unknown): DeliveryResult => {
      this.#warn(
        `Subscription ${spec.name} could not use the outbox database for message ${id} (${delivery.envelope.topic}); it will be delivered again`,
        error,
      );
      return { outcome: 'retry', delayMs: databaseRetryMs, error: describeError(error) };
    };
    try {
      if (inbox !== undefined && (await inbox.seen(id))) return { outcome: 'ack' };
    } catch (error) {
      return databaseFailed(error);
    }
    const lazy = outbox.lazyTransaction(inbox === undefined ? undefined : { inbox, subscription: spec.name, id });
    let result: DeliveryResult;
    try {
      result = await handle({ envelope: delivery.envelope, attempt: delivery.attempt, tx: lazy.tx });
    } catch (error) {
      // The pipeline turns a handler's errors into results; this is a bug below it. Undo, deliver again.
      await lazy.end(false);
      throw error;
    }
    const ended = await lazy.end(result.outcome === 'ack');
    if (ended === 'duplicate') return { outcome: 'ack' };
    if (typeof ended === 'object') return databaseFailed(ended.error);
    if (ended !== 'unused' || result.outcome !== 'ack' || inbox === undefined) return result;
    try {
      await inbox.record(id);
      return result;
    } catch (error) {
      return databaseFailed(error);
    }
  }

  /**
   * The broker's subscriptions, as far as it reports them, and the relay's backlog: what the outbox holds
   * that the broker does not have yet (the gauges, `bus.health()`).
   */
  async status(): Promise<BackboneStatus> {
    const [broker, outbox] = await Promise.all([
      // A broker that cannot answer now (health says so) must not hide the relay's backlog.
      this.broker.status?.().catch(() => ({ subscriptions: [] })) ?? { subscriptions: [] },
      this.outbox === undefined || this.#relayOptions === undefined ? undefined : this.outbox.status(),
    ]);
    if (outbox === undefined) return broker;
    const relay = outbox.subscriptions.find((subscription) => subscription.name === relayDefaults.subscription);
    return { subscriptions: broker.subscriptions, relay: { backlog: relay?.lag ?? 0, oldestAgeMs: relay?.oldestUnhandledAgeMs ?? null } };
  }

  async health(): Promise<readonly HealthCheck[]> {
    const [outbox, broker] = await Promise.all([this.outbox?.health() ?? [], this.broker.health?.() ?? []]);
    return [...broker, ...outbox];
  }

  deadLetters(): DeadLetterStore {
    return this.broker.deadLetters();
  }

  /** Every call gets the same promise (bus.stop() may be called twice at once). */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    this.#stopping.abort();
    this.#quotas?.close();
    if (this.#opening !== undefined) await this.#opening.catch(() => undefined);
    await this.#relay?.stop();
    await Promise.all([this.broker.close(), this.outbox?.close()]);
  }
}

/** A broker as a backbone, with a PostgreSQL outbox for transactional publishes and inboxes if given one. */
export function brokered(broker: Broker, options?: BrokeredOptions): BrokerBackbone {
  return new BrokerBackbone(broker, options);
}

/** The relay re-serialises what the outbox stored: the same envelope, the same id, the same key. */
function toOutgoing(envelope: Envelope): Outgoing {
  return { envelope, json: JSON.stringify(envelope.data), keyHash: keyHash(envelope.partitionkey) };
}

function noOutbox(backbone: string, what: string): TidingsError {
  return new TidingsError(
    'NO_TRANSACTION',
    `The ${backbone} backbone has no database to ${what} with: give it an outbox, ${backbone}({ ..., outbox: postgres({ url }) })`,
  );
}
