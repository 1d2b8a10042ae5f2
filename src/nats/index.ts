/**
 * The NATS JetStream backbone. `nats({ servers })` carries Tidings' messages on a JetStream stream; with
 * `outbox: postgres(...)` it also takes publishes made in a database transaction (through the outbox and
 * its relay) and gives handlers a transaction that commits with their inbox record. See docs/nats.md.
 */
import { hostname } from 'node:os';
import {
  jetstream,
  jetstreamManager,
  RetentionPolicy,
  StorageType,
  type JetStreamClient,
  type JetStreamManager,
  type StreamConfig,
  type StreamInfo,
} from '@nats-io/jetstream';
import { Kvm, type KV } from '@nats-io/kv';
import { connect, nanos, type NatsConnection } from '@nats-io/transport-node';
import type { Consumer, DeliveryHandler, Outgoing, SubscriptionSpec } from '../core/backbone.ts';
import type { Broker } from '../core/broker.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import { partitionOf } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import { OptionProblems } from '../core/options.ts';
import { defaultWarning } from '../core/warnings.ts';
import { brokered, type BrokerBackbone, type BrokeredOptions } from '../outbox/index.ts';
import { subjectOf, toWire } from './codec.ts';
import { NatsConsumer } from './consumer.ts';
import { NatsDeadLetters } from './dead-letters.ts';

export interface NatsOptions extends BrokeredOptions {
  /** NATS server URL(s): `nats://127.0.0.1:4222`. */
  servers: string | string[];
  /** The JetStream stream carrying the messages; created if missing. */
  stream?: string;
  /** Subjects are `<subjectPrefix>.<bucket>.<topic>`; the stream takes `<subjectPrefix>.<bucket>.>` for each bucket. */
  subjectPrefix?: string;
  /**
   * Slices of the key space (keyHash % buckets). Fixed for the life of a stream: it is written in the
   * stream's description and checked on open. Each subscription has one durable consumer per bucket, and a
   * bucket is the unit workers lease, so it caps how many processes share one subscription.
   */
  buckets?: number;
  /** JetStream de-duplicates a message id published twice within this window (a relay retry). */
  duplicateWindowMs?: number;
  /** Stream replicas (clustered JetStream). */
  replicas?: number;
  /** How long JetStream waits for an acknowledgement before redelivering; handlers in flight are kept alive. */
  ackWaitMs?: number;
  /** A bucket lease not renewed for this long is free; must exceed ackWaitMs + heartbeatMs (see docs). */
  leaseMs?: number;
  /** How often a worker renews its leases and rebalances buckets with the other workers. */
  heartbeatMs?: number;
  /** How long one pull waits for messages (JetStream's minimum is 1 s). */
  fetchExpiresMs?: number;
  /** A publish not confirmed by JetStream within this fails with BACKBONE_UNAVAILABLE (retryable). */
  publishTimeoutMs?: number;
  /** Pause between reconnection attempts; the client reconnects forever. */
  reconnectWaitMs?: number;
  /** Unacknowledged messages per bucket consumer = subscription concurrency x this (JetStream max_ack_pending). */
  ackPendingPerHandler?: number;
  /** Wait before trying NATS again after a dead letter, a hold or a read of the workers failed (a pull backs off from it too). */
  errorBackoffMs?: number;
}

export const natsDefaults = {
  stream: 'TIDINGS',
  subjectPrefix: 'tidings',
  buckets: 8,
  duplicateWindowMs: 120_000,
  replicas: 1,
  ackWaitMs: 10_000,
  leaseMs: 15_000,
  heartbeatMs: 2_000,
  fetchExpiresMs: 2_000,
  publishTimeoutMs: 5_000,
  reconnectWaitMs: 500,
  ackPendingPerHandler: 16,
  errorBackoffMs: 1_000,
} as const satisfies Required<Omit<NatsOptions, 'servers' | keyof BrokeredOptions>>;

export type NatsSettings = { -readonly [K in keyof typeof natsDefaults]: (typeof natsDefaults)[K] extends string ? string : number } & {
  readonly servers: string[];
};

const STREAM_NAME = /^[A-Za-z0-9_-]{1,200}$/;
const SUBJECT_PREFIX = /^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$/;
/** Written in the stream's description: server 2.9 streams have no metadata. */
const BUCKETS_MARK = /tidings buckets=(\d+)/;
/** The subject prefix, from the same description. */
const PREFIX_MARK = /, subjects (\S+)\.<bucket>\.<topic>/;

/** What consumers and the dead-letter store share with the broker once it is open. */
export interface NatsContext {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  /** Workers and bucket leases, entries expiring after leaseMs (see NatsConsumer), and the KV bucket's name. */
  readonly leases: KV;
  readonly leasesBucket: string;
  /** Messages waiting for a delayed retry, kept until they are done (see holds.ts), and the KV bucket's name. */
  readonly holds: KV;
  readonly holdsBucket: string;
  readonly settings: NatsSettings;
  readonly dlqStream: string;
  readonly dlqPrefix: string;
  readonly warn: (message: string, error?: unknown) => void;
}

export function resolveNatsSettings(options: NatsOptions): NatsSettings {
  const problems = new OptionProblems('nats()');
  const servers = typeof options?.servers === 'string' ? [options.servers] : options?.servers;
  problems.check(Array.isArray(servers) && servers.length > 0 && servers.every((s) => typeof s === 'string' && s.length > 0), 'servers must be a NATS URL or a list of them, for example nats://127.0.0.1:4222');
  problems.check(options.stream === undefined || (typeof options.stream === 'string' && STREAM_NAME.test(options.stream)), `stream must be letters, digits, "-" or "_", got ${JSON.stringify(options.stream)}`);
  problems.check(
    options.subjectPrefix === undefined || (typeof options.subjectPrefix === 'string' && SUBJECT_PREFIX.test(options.subjectPrefix)),
    `subjectPrefix must be NATS subject tokens joined by ".", without wildcards, got ${JSON.stringify(options.subjectPrefix)}`,
  );
  problems.integer('buckets', options.buckets, 1, 1_024);
  problems.integer('duplicateWindowMs', options.duplicateWindowMs, 1_000);
  problems.integer('replicas', options.replicas, 1, 5);
  problems.integer('ackWaitMs', options.ackWaitMs, 300);
  problems.integer('leaseMs', options.leaseMs, 500);
  problems.integer('heartbeatMs', options.heartbeatMs, 50);
  problems.integer('fetchExpiresMs', options.fetchExpiresMs, 1_000);
  problems.integer('publishTimeoutMs', options.publishTimeoutMs, 100);
  problems.integer('reconnectWaitMs', options.reconnectWaitMs, 10);
  problems.integer('ackPendingPerHandler', options.ackPendingPerHandler, 1, 10_000);
  problems.integer('errorBackoffMs', options.errorBackoffMs, 0);
  problems.throwIfAny();
  const settings: NatsSettings = {
    servers: servers as string[],
    stream: options.stream ?? natsDefaults.stream,
    subjectPrefix: options.subjectPrefix ?? natsDefaults.subjectPrefix,
    buckets: options.buckets ?? natsDefaults.buckets,
    duplicateWindowMs: options.duplicateWindowMs ?? natsDefaults.duplicateWindowMs,
    replicas: options.replicas ?? natsDefaults.replicas,
    ackWaitMs: options.ackWaitMs ?? natsDefaults.ackWaitMs,
    leaseMs: options.leaseMs ?? natsDefaults.leaseMs,
    heartbeatMs: options.heartbeatMs ?? natsDefaults.heartbeatMs,
    fetchExpiresMs: options.fetchExpiresMs ?? natsDefaults.fetchExpiresMs,
    publishTimeoutMs: options.publishTimeoutMs ?? natsDefaults.publishTimeoutMs,
    reconnectWaitMs: options.reconnectWaitMs ?? natsDefaults.reconnectWaitMs,
    ackPendingPerHandler: options.ackPendingPerHandler ?? natsDefaults.ackPendingPerHandler,
    errorBackoffMs: options.errorBackoffMs ?? natsDefaults.errorBackoffMs,
  };
  // A worker that died stops renewing; its bucket is free after leaseMs. By then every message it had
  // pulled must be back in JetStream's redelivery queue (ackWaitMs after its last keep-alive), or the
  // next owner would pull later messages of a key before the dead worker's earlier ones.
  const late = new OptionProblems('nats()');
  late.check(
    settings.leaseMs > settings.ackWaitMs + settings.heartbeatMs,
    `leaseMs (${settings.leaseMs}) must exceed ackWaitMs + heartbeatMs (${settings.ackWaitMs} + ${settings.heartbeatMs}), so that a dead worker's messages are redelivered before its bucket changes hands`,
  );
  late.check(settings.heartbeatMs * 2 < settings.leaseMs, `heartbeatMs (${settings.heartbeatMs}) must be under half of leaseMs (${settings.leaseMs})`);
  late.throwIfAny();
  return settings;
}

/**
 * The client's errors by name, not class: @nats-io/kv and @nats-io/jetstream pin exact versions of the
 * packages below them, so an application with other versions of them has two copies of each error class.
 */
const UNAVAILABLE = new Set(['TimeoutError', 'ClosedConnectionError', 'DrainingConnectionError', 'ConnectionError', 'NoResponders', 'NoRespondersError', 'RequestError']);

/** True for failures that a later try may not see: no connection, no JetStream answer, a timeout. */
export function isUnavailable(error: unknown): boolean {
  const { name, status } = (error ?? {}) as { name?: unknown; status?: unknown };
  return UNAVAILABLE.has(String(name)) || (apiErrorCode(error) !== undefined && status === 503);
}

/** nats-server's default max_payload, for a connection that has not said its own. */
const DEFAULT_MAX_PAYLOAD = 1_048_576;

/** What the client or the server says when a message breaks one of their limits, or undefined. */
function refusedForGood(error: unknown): string | undefined {
  const message = String((error as Error | undefined)?.message);
  return /max_payload|header size exceeds|maximum payload|message size exceeds/i.test(message) ? message : undefined;
}

/** JetStream's error code (err_code) of a refused API request: 10059 stream not found, 10071 wrong last sequence... */
export function apiErrorCode(error: unknown): number | undefined {
  const { name, code } = (error ?? {}) as { name?: unknown; code?: unknown };
  return /^(?:JetStreamApiError|ConsumerNotFoundError|StreamNotFoundError)$/.test(String(name)) && typeof code === 'number' ? code : undefined;
}

export class NatsBroker implements Broker {
  readonly name = 'nats';
  readonly settings: NatsSettings;
  readonly #warn: (message: string, error?: unknown) => void;
  #opening: Promise<NatsContext> | undefined;
  #closed = false;

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
    try {
      nc = await connect({
        servers: s.servers,
        name: `tidings ${hostname()}:${process.pid}`,
        maxReconnectAttempts: -1,
        reconnectTimeWait: s.reconnectWaitMs,
        reconnectJitter: Math.min(100, s.reconnectWaitMs),
        timeout: s.publishTimeoutMs,
      });
    } catch (error) {
      throw new TidingsError('BACKBONE_UNAVAILABLE', `Cannot connect to NATS at ${s.servers.join(', ')}: ${(error as Error).message}; start the server or check servers`, {
        cause: error,
        retryable: true,
      });
    }
    try {
      const jsm = await jetstreamManager(nc, { timeout: s.publishTimeoutMs });
      const description = `tidings buckets=${s.buckets}: Tidings messages, subjects ${s.subjectPrefix}.<bucket>.<topic>`;
      const info = await ensureStream(jsm, {
        name: s.stream,
        subjects: bucketSubjects(s.subjectPrefix, s.buckets),
        description,
        storage: StorageType.File,
        retention: RetentionPolicy.Limits,
        duplicate_window: nanos(s.duplicateWindowMs),
        num_replicas: s.replicas,
      }, (info) => {
        const stored = BUCKETS_MARK.exec(info.config.description ?? '')?.[1];
        if (stored === undefined) {
          throw new TidingsError('INVALID_OPTIONS', `Stream ${s.stream} exists but was not created by Tidings (its description has no "tidings buckets=N"); use another stream name`);
        }
        // Not given: the stream's own settings hold, so a service (or the CLI) needs only the stream's name.
        if (!this.#explicit.buckets) s.buckets = Number(stored);
        const prefix = PREFIX_MARK.exec(info.config.description ?? '')?.[1];
        if (!this.#explicit.subjectPrefix && prefix !== undefined) s.subjectPrefix = prefix;
        if (prefix !== undefined && prefix !== s.subjectPrefix) {
          throw new TidingsError('INVALID_OPTIONS', `Stream ${s.stream} carries subjects ${prefix}.<bucket>.<topic>, not ${s.subjectPrefix}.<bucket>.<topic>. Use subjectPrefix: '${prefix}' (or leave it out), or a new stream`);
        }
        if (Number(stored) !== s.buckets) {
          throw new TidingsError(
            'INVALID_OPTIONS',
            `Stream ${s.stream} was created with ${stored} buckets, not ${s.buckets}: changing the count would break per-key order. Use buckets: ${stored} (or leave it out), or a new stream`,
          );
        }
      });
      // A stream made before the stream took only its buckets' subjects (it took `<prefix>.>`) is narrowed:
      // a message published outside them would never reach a bucket's consumer (test/nats.input.test.ts).
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
      const js = jetstream(nc, { timeout: s.publishTimeoutMs });
      const kvm = new Kvm(js);
      const leasesBucket = `${s.stream}_leases`;
      const holdsBucket = `${s.stream}_holds`;
      const leases = await kvm.create(leasesBucket, { ttl: s.leaseMs, history: 1, replicas: s.replicas, timeout: s.publishTimeoutMs });
      const holds = await kvm.create(holdsBucket, { history: 1, replicas: s.replicas, timeout: s.publishTimeoutMs });
      return { nc, js, jsm, leases, leasesBucket, holds, holdsBucket, settings: s, dlqStream, dlqPrefix, warn: this.#warn };
    } catch (error) {
      await nc.close().catch(() => undefined);
      if (error instanceof TidingsError) throw error;
      throw new TidingsError('BACKBONE_UNAVAILABLE', `NATS at ${s.servers.join(', ')} did not set up stream ${s.stream}: ${(error as Error).message}; is JetStream enabled (nats-server -js)?`, {
        cause: error,
        retryable: isUnavailable(error),
      });
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
    const wires = messages.map((message) => toWire(message, subjectOf(s.subjectPrefix, partitionOf(message.keyHash, s.buckets), message.envelope.topic), maxPayload));
    const results = await Promise.allSettled(wires.map((wire) => js.publish(wire.subject, wire.payload, { headers: wire.headers, timeout: s.publishTimeoutMs })));
    const failed = results.findIndex((result) => result.status === 'rejected');
    if (failed === -1) return;
    const error = (results[failed] as PromiseRejectedResult).reason as unknown;
    const message = messages[failed]!.envelope;
    const stored = results.filter((result) => result.status === 'fulfilled').length;
    const ref = { id: message.id, topic: message.topic, key: message.partitionkey };
    const refused = refusedForGood(error);
    if (refused !== undefined) {
      // The server's limits differ from what toWire assumed (a cluster with a lower max_payload, say).
      throw new TidingsError('LIMIT_EXCEEDED', `NATS refused message ${message.id} (${message.topic}) for good: ${refused}`, { cause: error, ref, retryable: false });
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
export function nats(options: NatsOptions): BrokerBackbone {
  const { outbox, relay, onWarning } = options;
  return brokered(new NatsBroker(options), { outbox, relay, onWarning });
}

export { NatsConsumer } from './consumer.ts';
export { NatsDeadLetters } from './dead-letters.ts';
