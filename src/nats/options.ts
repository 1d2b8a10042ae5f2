import { OptionProblems, optionNames } from '../core/options.ts';
import type { BrokeredOptions } from '../outbox/index.ts';

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

const natsOptionNames = optionNames<NatsOptions>()(
  'servers',
  'stream',
  'subjectPrefix',
  'buckets',
  'duplicateWindowMs',
  'replicas',
  'ackWaitMs',
  'leaseMs',
  'heartbeatMs',
  'fetchExpiresMs',
  'publishTimeoutMs',
  'reconnectWaitMs',
  'ackPendingPerHandler',
  'errorBackoffMs',
  'outbox',
  'relay',
  'onWarning',
  'tenancy',
);

export function resolveNatsSettings(options: NatsOptions): NatsSettings {
  const problems = new OptionProblems('nats()');
  problems.unknownKeys(options, natsOptionNames);
  const servers = typeof options?.servers === 'string' ? [options.servers] : options?.servers;
  problems.check(
    Array.isArray(servers) && servers.length > 0 && servers.every((s) => typeof s === 'string' && s.length > 0),
    'servers must be a NATS URL or a list of them, for example nats://127.0.0.1:4222',
  );
  problems.check(
    options.stream === undefined || (typeof options.stream === 'string' && STREAM_NAME.test(options.stream)),
    `stream must be letters, digits, "-" or "_", got ${JSON.stringify(options.stream)}`,
  );
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
