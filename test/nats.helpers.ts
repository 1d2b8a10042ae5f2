/** Test helpers for the NATS backbone: quick timings and a stream of its own per test. */
import type { TestContext } from 'node:test';
import { connect as natsConnect } from 'nats';
import type { NatsOptions } from '../src/nats/index.ts';
import { NATS_URL, requireBroker } from './helpers.ts';

/** Timings that keep tests quick: leases move within seconds, pulls end every second. */
export const quickNats = {
  buckets: 4,
  ackWaitMs: 1_500,
  leaseMs: 2_500,
  heartbeatMs: 300,
  fetchExpiresMs: 1_000,
  publishTimeoutMs: 2_000,
  reconnectWaitMs: 100,
  errorBackoffMs: 200,
  onWarning: () => undefined,
} satisfies Partial<NatsOptions>;

export interface NatsNamespace {
  readonly stream: string;
  readonly subjectPrefix: string;
  options(extra?: Partial<NatsOptions>): NatsOptions;
  cleanup(): Promise<void>;
}

/** A stream and subject prefix of its own; cleanup deletes the stream, its dead letters, leases and holds. */
export async function natsNamespace(t: TestContext, prefix = 't'): Promise<NatsNamespace | undefined> {
  if (!(await requireBroker(t, 'NATS', NATS_URL))) return undefined;
  const id = `${prefix}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
  const stream = `T_${id}`;
  const subjectPrefix = `t_${id}`;
  return {
    stream,
    subjectPrefix,
    options: (extra = {}) => ({ servers: NATS_URL, stream, subjectPrefix, ...quickNats, ...extra }),
    cleanup: async () => {
      const nc = await natsConnect({ servers: NATS_URL });
      try {
        const jsm = await nc.jetstreamManager();
        for (const name of [stream, `${stream}_DLQ`, `KV_${stream}_leases`, `KV_${stream}_holds`]) await jsm.streams.delete(name).catch(() => undefined);
      } finally {
        await nc.close();
      }
    },
  };
}
