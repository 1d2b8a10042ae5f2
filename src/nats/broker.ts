/**
 * The NATS JetStream broker: opens the connection (connection.ts) and the streams and KV buckets
 * (topology.ts) once, publishes (publisher.ts), and starts a consumer per subscription (consume/).
 */
import { fairSharesIgnored, type Consumer, type DeliveryHandler, type Outgoing, type SubscriptionSpec } from '../core/backbone.ts';
import type { Broker } from '../core/broker.ts';
import type { BackboneDescription, ContractRegistry } from '../core/catalog.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import { TidingsError } from '../core/errors.ts';
import { defaultWarning } from '../core/warnings.ts';
import { loadClient } from './client.ts';
import { connect } from './connection.ts';
import { NatsConsumer } from './consume/consumer.ts';
import type { NatsContext } from './context.ts';
import { NatsDeadLetters } from './dead-letters.ts';
import { isUnavailable } from './errors.ts';
import { natsRegistry } from './registry.ts';
import { claimCommands } from './owners.ts';
import { resolveNatsSettings, type NatsOptions, type NatsSettings } from './options.ts';
import { publishAll } from './publisher.ts';
import { openTopology, type Explicit } from './topology.ts';
import { natsHealth, natsStatus, watchConnection, type ConsumedSubscription } from './observe.ts';
import { nameToken } from './codec.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { BackboneStatus, HealthCheck } from '../telemetry/status.ts';

export class NatsBroker implements Broker {
  readonly name = 'nats';
  readonly settings: NatsSettings;
  readonly #warn: (message: string, error?: unknown) => void;
  #opening: Promise<NatsContext> | undefined;
  #closed = false;
  #observer: BackboneObserver | undefined;
  readonly #consumed = new Set<ConsumedSubscription>();

  /** Options given explicitly; the others follow an existing stream. */
  readonly #explicit: Explicit;

  constructor(options: NatsOptions) {
    this.settings = resolveNatsSettings(options);
    this.#explicit = { buckets: options.buckets !== undefined, subjectPrefix: options.subjectPrefix !== undefined };
    this.#warn = options.onWarning ?? defaultWarning;
  }

  async open(): Promise<void> {
    await this.context();
  }
  observe(observer: BackboneObserver): void {
    this.#observer = observer;
  }

  async health(): Promise<readonly HealthCheck[]> {
    return natsHealth((await this.context()).nc, this.settings.servers);
  }

  /** @internal The connection and topology, opened once. */
  context(): Promise<NatsContext> {
    if (this.#closed) return Promise.reject(new TidingsError('STOPPED', 'This NATS backbone is closed'));
    this.#opening ??= this.#open().catch((error: unknown) => {
      this.#opening = undefined;
      throw error;
    });
    return this.#opening;
  }

  async #open(): Promise<NatsContext> {
    const s = this.settings;
    const client = await loadClient();
    const nc = await connect(client.transport, s);
    watchConnection(nc, () => this.#observer);
    try {
      const topology = await openTopology(client, nc, s, this.#explicit);
      return { nc, ...topology, settings: s, warn: this.#warn, observer: () => this.#observer };
    } catch (error) {
      await nc.close().catch(() => undefined);
      if (error instanceof TidingsError) throw error;
      throw new TidingsError(
        'BACKBONE_UNAVAILABLE',
        `NATS at ${s.servers.join(', ')} did not set up stream ${s.stream}: ${(error as Error).message}; is JetStream enabled (nats-server -js)?`,
        {
          cause: error,
          retryable: isUnavailable(error),
        },
      );
    }
  }

  /** See publisher.ts: every message at once, in order, each stored once within the duplicate window. */
  async publish(messages: readonly Outgoing[]): Promise<void> {
    if (messages.length === 0) return;
    await publishAll(await this.context(), messages);
  }

  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<undefined>): Promise<Consumer> {
    const ignored = fairSharesIgnored(spec, 'NATS', 'a subject prefix');
    if (ignored !== undefined) this.#warn(ignored);
    const ctx = await this.context();
    await claimCommands(ctx, spec);
    const consumer = new NatsConsumer(ctx, spec, handle);
    await consumer.start();
    const consumed = { name: spec.name, token: nameToken(spec.name) };
    this.#consumed.add(consumed);
    return {
      stop: async () => {
        await consumer.stop();
        this.#consumed.delete(consumed);
      },
    };
  }

  /** The subscriptions this process consumes: lag, held keys, dead letters, from JetStream (observe.ts). */
  async status(): Promise<BackboneStatus> {
    // Nothing consumed here: nothing to ask, and a scrape must not be what opens the connection.
    if (this.#consumed.size === 0) return { subscriptions: [] };
    return natsStatus(await this.context(), [...this.#consumed]);
  }

  describe(): BackboneDescription {
    return { name: this.name, settings: { stream: this.settings.stream, subjectPrefix: this.settings.subjectPrefix } };
  }

  /** The registry in a KV bucket of the stream (registry.ts): for a bus without an outbox database. */
  contracts(): ContractRegistry {
    return natsRegistry(() => this.context());
  }

  deadLetters(): DeadLetterStore {
    return new NatsDeadLetters(() => this.context());
  }

  async close(): Promise<void> {
    this.#closed = true;
    const opening = this.#opening;
    this.#opening = undefined;
    if (opening === undefined) return;
    const ctx = await opening.catch(() => undefined);
    if (ctx === undefined) return;
    // Acknowledgements are fire-and-forget: flush them before the connection goes.
    await ctx.nc.flush().catch(() => undefined);
    await ctx.nc.close().catch(() => undefined);
  }
}
