/** The NATS JetStream broker: the stream, its buckets and consumers, publishing with confirms. */
import { hostname } from 'node:os';
import type { JetStreamManager, StreamConfig, StreamInfo } from '@nats-io/jetstream';
import type { NatsConnection } from '@nats-io/transport-node';
import type { Consumer, DeliveryHandler, Outgoing, SubscriptionSpec } from '../core/backbone.ts';
import type { Broker } from '../core/broker.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import { partitionOf } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import { defaultWarning } from '../core/warnings.ts';
import { loadClient } from './client.ts';
import { subjectOf, toWire } from './codec.ts';
import { NatsConsumer } from './consumer.ts';
import { NatsDeadLetters } from './dead-letters.ts';
import type { NatsContext } from './context.ts';
import { apiErrorCode, isUnavailable, refusedForGood } from './errors.ts';
import { resolveNatsSettings, type NatsOptions, type NatsSettings } from './options.ts';
import { natsHealth, watchConnection } from './observe.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { HealthCheck } from '../telemetry/status.ts';

/** Written in the stream's description: server 2.9 streams have no metadata. */
const BUCKETS_MARK = /tidings buckets=(\d+)/;
/** The subject prefix, from the same description. */
const PREFIX_MARK = /, subjects (\S+)\.<bucket>\.<topic>/;

/** nats-server's default max_payload, for a connection that has not said its own. */
const DEFAULT_MAX_PAYLOAD = 1_048_576;

export class NatsBroker implements Broker {
  readonly name = 'nats';
  readonly settings: NatsSettings;
  readonly #warn: (message: string, error?: unknown) => void;
  #opening: Promise<NatsContext> | undefined;
  #closed = false;
  #observer: BackboneObserver | undefined;

  /** Options given explicitly; the others follow an existing stream. */
  readonly #explicit: { readonly buckets: boolean; readonly subjectPrefix: boolean };

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
    let nc: NatsConnection;
    const { transport, jetstream, kv } = await loadClient();
    const { nanos } = transport;
    const { RetentionPolicy, StorageType } = jetstream;
    try {
      nc = await transport.connect({
        servers: s.servers,
        name: `tidings ${hostname()}:${process.pid}`,
        maxReconnectAttempts: -1,
        reconnectTimeWait: s.reconnectWaitMs,
        reconnectJitter: Math.min(100, s.reconnectWaitMs),
        timeout: s.publishTimeoutMs,
      });
    } catch (error) {
      throw new TidingsError(
        'BACKBONE_UNAVAILABLE',
        `Cannot connect to NATS at ${s.servers.join(', ')}: ${(error as Error).message}; start the server or check servers`,
        {
          cause: error,
          retryable: true,
        },
      );
    }
    watchConnection(nc, () => this.#observer);
    try {
      const jsm = await jetstream.jetstreamManager(nc, { timeout: s.publishTimeoutMs });
      const description = `tidings buckets=${s.buckets}: Tidings messages, subjects ${s.subjectPrefix}.<bucket>.<topic>`;
      const info = await ensureStream(
        jsm,
        {
          name: s.stream,
          subjects: bucketSubjects(s.subjectPrefix, s.buckets),
          description,
          storage: StorageType.File,
          retention: RetentionPolicy.Limits,
          duplicate_window: nanos(s.duplicateWindowMs),
          num_replicas: s.replicas,
        },
        (info) => {
          const stored = BUCKETS_MARK.exec(info.config.description ?? '')?.[1];
          if (stored === undefined) {
            throw new TidingsError(
              'INVALID_OPTIONS',
              `Stream ${s.stream} exists but was not created by Tidings (its description has no "tidings buckets=N"); use another stream name`,
            );
          }
          // Not given: the stream's own settings hold, so a service (or the CLI) needs only the stream's name.
          if (!this.#explicit.buckets) s.buckets = Number(stored);
          const prefix = PREFIX_MARK.exec(info.config.description ?? '')?.[1];
          if (!this.#explicit.subjectPrefix && prefix !== undefined) s.subjectPrefix = prefix;
          if (prefix !== undefined && prefix !== s.subjectPrefix) {
            throw new TidingsError(
              'INVALID_OPTIONS',
              `Stream ${s.stream} carries subjects ${prefix}.<bucket>.<topic>, not ${s.subjectPrefix}.<bucket>.<topic>. Use subjectPrefix: '${prefix}' (or leave it out), or a new stream`,
            );
          }
          if (Number(stored) !== s.buckets) {
            throw new TidingsError(
              'INVALID_OPTIONS',
              `Stream ${s.stream} was created with ${stored} buckets, not ${s.buckets}: changing the count would break per-key order. Use buckets: ${stored} (or leave it out), or a new stream`,
            );
          }
        },
      );
      // A stream made before the stream took only its buckets' subjects (it took `<prefix>.>`) is narrowed:
      // a message published outside them would never reach a bucket's consumer (test/input.nats.test.ts).
      const subjects = bucketSubjects(s.subjectPrefix, s.buckets);
      if (info.config.subjects?.join(' ') !== subjects.join(' ')) await jsm.streams.update(s.stream, { subjects });
      const dlqStream = `${s.stream}_DLQ`;
      const dlqPrefix = `${s.subjectPrefix}_dlq`;
      await ensureStream(jsm, {
        name: dlqStream,
        subjects: [`${dlqPrefix}.>`],
        description: `Tidings dead letters of stream ${s.stream}`,
        storage: StorageType.File,
        retention: RetentionPolicy.Limits,
        duplicate_window: nanos(s.duplicateWindowMs),
        num_replicas: s.replicas,
      });
      const js = jetstream.jetstream(nc, { timeout: s.publishTimeoutMs });
      const kvm = new kv.Kvm(js);
      const leasesBucket = `${s.stream}_leases`;
      const holdsBucket = `${s.stream}_holds`;
      const leases = await kvm.create(leasesBucket, { ttl: s.leaseMs, history: 1, replicas: s.replicas, timeout: s.publishTimeoutMs });
      const holds = await kvm.create(holdsBucket, { history: 1, replicas: s.replicas, timeout: s.publishTimeoutMs });
      return { nc, js, jsm, leases, leasesBucket, holds, holdsBucket, settings: s, dlqStream, dlqPrefix, warn: this.#warn, observer: () => this.#observer };
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

  /**
   * Publishes every message at once on one connection, so JetStream stores them in the order given; each
   * carries its id as Nats-Msg-Id, so a retry within the duplicate window is stored once. A message NATS can
   * never take is refused before any is sent (toWire: LIMIT_EXCEEDED or INVALID_PAYLOAD, not retryable); a
   * publish not confirmed is BACKBONE_UNAVAILABLE (retryable).
   */
  async publish(messages: readonly Outgoing[]): Promise<void> {
    if (messages.length === 0) return;
    const { js, nc } = await this.context();
    const s = this.settings;
    const maxPayload = nc.info?.max_payload ?? DEFAULT_MAX_PAYLOAD;
    const wires = messages.map((message) =>
      toWire(message, subjectOf(s.subjectPrefix, partitionOf(message.keyHash, s.buckets), message.envelope.topic), maxPayload),
    );
    const results = await Promise.allSettled(
      wires.map((wire) => js.publish(wire.subject, wire.payload, { headers: wire.headers, timeout: s.publishTimeoutMs })),
    );
    const failed = results.findIndex((result) => result.status === 'rejected');
    if (failed === -1) return;
    const error = (results[failed] as PromiseRejectedResult).reason as unknown;
    const message = messages[failed]!.envelope;
    const stored = results.filter((result) => result.status === 'fulfilled').length;
    const ref = { id: message.id, topic: message.topic, key: message.partitionkey };
    const refused = refusedForGood(error);
    if (refused !== undefined) {
      // The server's limits differ from what toWire assumed (a cluster with a lower max_payload, say).
      throw new TidingsError('LIMIT_EXCEEDED', `NATS refused message ${message.id} (${message.topic}) for good: ${refused}`, {
        cause: error,
        ref,
        retryable: false,
      });
    }
    // Anything else may pass later: a server down or slow, a stream full with discard new, a leader election.
    throw new TidingsError(
      isUnavailable(error) ? 'BACKBONE_UNAVAILABLE' : 'PUBLISH_FAILED',
      `NATS did not confirm message ${message.id} (${message.topic})${messages.length > 1 ? ` and ${messages.length - stored - 1} more of ${messages.length}` : ''}: ${(error as Error).message}. Publish again with the same ids: JetStream drops copies within its duplicate window`,
      { cause: error, ref, retryable: true },
    );
  }

  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<undefined>): Promise<Consumer> {
    const ctx = await this.context();
    const consumer = new NatsConsumer(ctx, spec, handle);
    await consumer.start();
    return consumer;
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

/**
 * The stream's subjects: one `<prefix>.<bucket>.>` per bucket and nothing else, so JetStream refuses a
 * message no bucket's consumer would ever read (no bucket number, or one past the last), instead of
 * storing it where nobody delivers or dead-letters it.
 */
export function bucketSubjects(prefix: string, buckets: number): string[] {
  return Array.from({ length: buckets }, (_, bucket) => `${prefix}.${bucket}.>`);
}

/** Creates the stream, or checks the existing one (`check` throws if it is not ours to use). */
async function ensureStream(jsm: JetStreamManager, config: Partial<StreamConfig> & { name: string }, check?: (info: StreamInfo) => void): Promise<StreamInfo> {
  try {
    const info = await jsm.streams.info(config.name);
    check?.(info);
    return info;
  } catch (error) {
    if (error instanceof TidingsError) throw error;
    if (apiErrorCode(error) !== 10059) throw error; // 10059: stream not found
  }
  try {
    return await jsm.streams.add(config);
  } catch (error) {
    // Another process created it at the same moment.
    const info = await jsm.streams.info(config.name).catch(() => undefined);
    if (info === undefined) throw error;
    check?.(info);
    return info;
  }
}

/**
 * The NATS JetStream backbone. Publishes outside a transaction go straight to JetStream; with an `outbox`,
 * `publish(..., { tx })` writes to PostgreSQL and a relay moves committed messages to JetStream.
 */
