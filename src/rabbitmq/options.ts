/** The RabbitMQ backbone's options, their defaults, and their validation. */
import { OptionProblems, optionNames } from '../core/options.ts';
import { defaultWarning } from '../core/warnings.ts';
import type { BrokeredOptions, RelayOptions } from '../outbox/index.ts';
import type { PostgresBackbone } from '../postgres/backbone.ts';
import { redact } from './connection.ts';

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
  /** Per-tenant publish rates: shared through the outbox's database if there is one, else per process (docs/tenancy.md, "Quotas"). */
  tenancy?: BrokeredOptions['tenancy'];
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

/** The options resolved: every default applied, `prefetch` left to each subscription's concurrency. */
export type RabbitMqSettings = Required<Omit<RabbitMqOptions, 'outbox' | 'relay' | 'prefetch' | 'onWarning' | 'tenancy'>> & {
  prefetch: number | undefined;
  warn: (message: string, error?: unknown) => void;
};

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
  'tenancy',
);

/** Checks every option (OptionProblems names each bad one) and applies the defaults. */
export function resolveRabbitMqSettings(options: RabbitMqOptions): RabbitMqSettings {
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
  return {
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
}

export interface RabbitMqBackboneOptions extends RabbitMqOptions {}
