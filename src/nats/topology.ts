/**
 * What a NATS backbone keeps in JetStream: the stream of messages (one subject per bucket and topic), the
 * dead-letter stream, and two KV buckets (worker announcements and bucket leases; delayed retries' holds).
 * Created if missing; an existing stream's bucket count and subject prefix are read from its description
 * (server 2.9 streams have no metadata) and must agree with the options given.
 */
import type { JetStreamClient, JetStreamManager, StreamConfig, StreamInfo } from '@nats-io/jetstream';
import type { KV } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import { TidingsError } from '../core/errors.ts';
import type { NatsClient } from './client.ts';
import { apiErrorCode } from './errors.ts';
import type { NatsSettings } from './options.ts';

/** Written in the stream's description: server 2.9 streams have no metadata. */
const BUCKETS_MARK = /tidings buckets=(\d+)/;
/** The subject prefix, from the same description. */
const PREFIX_MARK = /, subjects (\S+)\.<bucket>\.<topic>/;

/** Options given explicitly; the others follow an existing stream. */
export interface Explicit {
  readonly buckets: boolean;
  readonly subjectPrefix: boolean;
}

/** The streams and KV buckets, opened (see NatsContext). */
export interface Topology {
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  readonly leases: KV;
  readonly leasesBucket: string;
  readonly holds: KV;
  readonly holdsBucket: string;
  readonly dlqStream: string;
  readonly dlqPrefix: string;
}

/** Creates or checks the streams and KV buckets; `s` takes an existing stream's buckets and prefix unless given. */
export async function openTopology(client: NatsClient, nc: NatsConnection, s: NatsSettings, explicit: Explicit): Promise<Topology> {
  const { jetstream, kv } = client;
  const { nanos } = client.transport;
  const { RetentionPolicy, StorageType } = jetstream;
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
      if (!explicit.buckets) s.buckets = Number(stored);
      const prefix = PREFIX_MARK.exec(info.config.description ?? '')?.[1];
      if (!explicit.subjectPrefix && prefix !== undefined) s.subjectPrefix = prefix;
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
  return { js, jsm, leases, leasesBucket, holds, holdsBucket, dlqStream, dlqPrefix };
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
