/**
 * What the NATS backbone tells the bus's telemetry (src/telemetry): its connection's drops and returns (from
 * nats.js's status events: it reconnects by itself), whether the server answers, for `bus.health()`, and the
 * status of the subscriptions this process consumes, for the gauges, all from JetStream itself:
 *
 * - lag, per bucket (partition): the bucket's durable consumer's `num_pending` (not delivered yet) plus
 *   `num_ack_pending` (delivered, not acknowledged). A bucket's consumer reads every topic of the bucket, so
 *   this counts the messages of topics the subscription does not have too, until it acknowledges them unread;
 * - oldest unhandled age: of the first message after the consumer's acknowledgement floor;
 * - held keys: the holds in the holds KV bucket (one per key waiting for a delayed retry);
 * - dead letters: the subscription's messages in the dead-letter stream.
 *
 * Proven by test/metrics.brokers.test.ts, which parses them from `tidings/metrics`.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import type { MsgRequest } from '@nats-io/jetstream';
import { healthDefaults } from '../telemetry/health.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { BackboneStatus, HealthCheck, PartitionState, SubscriptionState } from '../telemetry/status.ts';
import { apiErrorCode } from './errors.ts';
import type { NatsContext } from './context.ts';

/** Emits `connection:lost` and `connection:restored` for `nc` until it closes. */
export function watchConnection(nc: NatsConnection, observer: () => BackboneObserver | undefined): void {
  void (async () => {
    for await (const status of nc.status()) {
      if (status.type === 'disconnect') observer()?.emit('connection:lost', { backbone: 'nats', detail: `NATS at ${status.server}` });
      else if (status.type === 'reconnect') observer()?.emit('connection:restored', { backbone: 'nats', detail: `NATS at ${status.server}` });
    }
  })().catch(() => undefined);
}

/** The server answers a round trip (a flush) within half the health check's time. */
export async function natsHealth(nc: NatsConnection, servers: readonly string[]): Promise<HealthCheck[]> {
  const where = `NATS at ${servers.join(', ')}`;
  if (nc.isClosed()) return [{ name: 'broker', ok: false, detail: `the connection to ${where} is closed` }];
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<Error>((resolve) => {
    timer = setTimeout(() => resolve(new Error(`no answer within ${healthDefaults.timeoutMs / 2} ms`)), healthDefaults.timeoutMs / 2);
  });
  try {
    const answer = await Promise.race([
      nc.flush().then(
        () => undefined,
        (error: unknown) => error as Error,
      ),
      late,
    ]);
    if (answer === undefined) return [{ name: 'broker', ok: true, detail: `connected to ${where}` }];
    return [{ name: 'broker', ok: false, detail: `${where} is unreachable: ${answer.message}` }];
  } finally {
    clearTimeout(timer);
  }
}

/** A subscription consumed by this process: its name and the NATS token its durables and holds are named by. */
export interface ConsumedSubscription {
  readonly name: string;
  readonly token: string;
}

export async function natsStatus(ctx: NatsContext, consumed: readonly ConsumedSubscription[]): Promise<BackboneStatus> {
  const [held, dead] = await Promise.all([
    subjectCounts(ctx, `KV_${ctx.holdsBucket}`, `$KV.${ctx.holdsBucket}.*.*.*`),
    subjectCounts(ctx, ctx.dlqStream, `${ctx.dlqPrefix}.>`),
  ]);
  const now = Date.now();
  const subscriptions = await Promise.all(
    consumed.map(async ({ name, token }): Promise<SubscriptionState> => {
      const partitions = await Promise.all(Array.from({ length: ctx.settings.buckets }, (_, bucket) => bucketState(ctx, token, bucket, now)));
      const ages = partitions.map((partition) => partition.oldestUnhandledAgeMs).filter((age): age is number => typeof age === 'number');
      return {
        name,
        lag: partitions.reduce((sum, partition) => sum + partition.lag, 0),
        oldestUnhandledAgeMs: ages.length > 0 ? Math.max(...ages) : null,
        // `$KV.<holds bucket>.<token>.<bucket>.<seq>`: one key per held message, the head of its key.
        heldKeys: subjectsUnder(held, `$KV.${ctx.holdsBucket}.${token}.`),
        // `<prefix>_dlq.<token>.<topic>`: one message per dead letter.
        deadLetters: messagesUnder(dead, `${ctx.dlqPrefix}.${token}.`),
        partitions,
      };
    }),
  );
  return { subscriptions };
}

async function bucketState(ctx: NatsContext, token: string, bucket: number, now: number): Promise<PartitionState> {
  const { jsm, settings } = ctx;
  const info = await jsm.consumers.info(settings.stream, `${token}_${bucket}`).catch((error: unknown) => {
    if (apiErrorCode(error) === 10014) return undefined; // not created yet (the subscription is starting)
    throw error;
  });
  const lag = info === undefined ? 0 : info.num_pending + info.num_ack_pending;
  if (info === undefined || lag === 0) return { partition: bucket, lag, oldestUnhandledAgeMs: null };
  // The first message of the bucket after the acknowledgement floor is the oldest not acknowledged.
  const oldest = await jsm.streams
    .getMessage(settings.stream, { seq: info.ack_floor.stream_seq + 1, next_by_subj: info.config.filter_subject } as unknown as MsgRequest)
    .catch(() => null);
  return { partition: bucket, lag, oldestUnhandledAgeMs: oldest === null ? undefined : Math.max(0, now - oldest.time.getTime()) };
}

/** Messages per subject of `stream` under `filter`. */
async function subjectCounts(ctx: NatsContext, stream: string, filter: string): Promise<Record<string, number>> {
  const info = await ctx.jsm.streams.info(stream, { subjects_filter: filter });
  return info.state.subjects ?? {};
}

function messagesUnder(counts: Record<string, number>, prefix: string): number {
  let total = 0;
  for (const [subject, count] of Object.entries(counts)) if (subject.startsWith(prefix)) total += count;
  return total;
}

function subjectsUnder(counts: Record<string, number>, prefix: string): number {
  return Object.keys(counts).filter((subject) => subject.startsWith(prefix)).length;
}
