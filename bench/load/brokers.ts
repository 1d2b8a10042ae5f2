/**
 * What the broker children share (bench/tidings/rabbitmq.ts and nats.ts, bench/peers/amqp.ts and natsjs.ts): the servers,
 * a namespace per task and its removal, the windows that keep Tidings and the plain clients comparable,
 * and a handler count that tells duplicates apart.
 */
import amqp from 'amqplib';
import { connect as natsConnect, type JetStreamManager } from 'nats';
import { Counter, rate } from './measure.ts';

export const RABBITMQ_URL = process.env.RABBITMQ_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
export const NATS_URL = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';

/** Server processes counted in the latency phases' CPU figure. */
export const RABBITMQ_PROCESSES = ['beam.smp'];
export const NATS_PROCESSES = ['nats-server'];

/** Tidings' subscriptions in these rows: as in the PostgreSQL rows (bench/tidings/postgres.ts). */
export const CONCURRENCY = 8;
export const PARTITIONS = 4;
/** Tidings on NATS keeps its default bucket count. */
export const NATS_BUCKETS = 8;
/**
 * The plain clients get the same window of unacknowledged messages as Tidings: RabbitMQ prefetch is
 * 2 x concurrency per partition queue (4 queues), JetStream max_ack_pending is concurrency x 16 per bucket
 * consumer (8 buckets).
 */
export const AMQP_PREFETCH = PARTITIONS * 2 * CONCURRENCY;
export const NATS_MAX_ACK_PENDING = NATS_BUCKETS * CONCURRENCY * 16;

export const PRODUCERS = 10;
export const CHUNK = 1_000;

/** Streams of this harness start with it: a child removes what a killed earlier child left. */
export const NATS_STREAM_MARK = 'TBENCH_';

/** A name unique to this task: `<pid>_<random>`. */
export function uniqueId(): string {
  return `${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * Deletes queues and exchanges by name (each on its own channel: a failure closes only that channel).
 * RabbitMQ cannot list by prefix over AMQP, so the children name what they made; `rabbitmqctl` would cost
 * an Erlang VM start per task.
 */
export async function deleteRabbit(queues: readonly string[], exchanges: readonly string[]): Promise<void> {
  const connection = await amqp.connect(RABBITMQ_URL);
  connection.on('error', () => undefined);
  try {
    for (const [kind, name] of [...queues.map((q) => ['queue', q] as const), ...exchanges.map((e) => ['exchange', e] as const)]) {
      const channel = await connection.createChannel();
      channel.on('error', () => undefined);
      try {
        if (kind === 'queue') await channel.deleteQueue(name);
        else await channel.deleteExchange(name);
        await channel.close();
      } catch {
        // already gone
      }
    }
  } finally {
    await connection.close().catch(() => undefined);
  }
}

/**
 * Messages left in the queues once their consumers' channels are closed (which hands unacknowledged ones
 * back), waited for up to `timeoutMs`: a quorum queue applies acknowledgements and counts a moment later.
 */
export async function rabbitReady(queues: readonly string[], timeoutMs = 5_000): Promise<number> {
  const connection = await amqp.connect(RABBITMQ_URL);
  connection.on('error', () => undefined);
  try {
    const channel = await connection.createChannel();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let ready = 0;
      for (const queue of queues) ready += (await channel.checkQueue(queue)).messageCount;
      if (ready === 0 || Date.now() > deadline) {
        await channel.close();
        return ready;
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  } finally {
    await connection.close().catch(() => undefined);
  }
}

async function withJsm<T>(fn: (jsm: JetStreamManager) => Promise<T>): Promise<T> {
  const nc = await natsConnect({ servers: NATS_URL });
  try {
    return await fn(await nc.jetstreamManager());
  } finally {
    await nc.close();
  }
}

/** Deletes the streams named, and any stream of this harness left by a killed run (one run at a time holds the bench lock). */
export async function deleteNats(streams: readonly string[]): Promise<void> {
  await withJsm(async (jsm) => {
    const names = new Set(streams);
    for await (const info of jsm.streams.list()) {
      const name = info.config.name;
      if (name.startsWith(NATS_STREAM_MARK) || name.startsWith(`KV_${NATS_STREAM_MARK}`)) names.add(name);
    }
    for (const name of names) await jsm.streams.delete(name).catch(() => undefined);
  });
}

/**
 * Messages of a stream's consumers not yet acknowledged (pending + ack pending), waited for up to
 * `timeoutMs`: acknowledgements are fire-and-forget, the server counts them a moment later.
 */
export async function natsUnacked(stream: string, timeoutMs = 5_000): Promise<number> {
  return withJsm(async (jsm) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let left = 0;
      for await (const info of jsm.consumers.list(stream)) left += info.num_pending + info.num_ack_pending;
      if (left === 0 || Date.now() > deadline) return left;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  });
}

/**
 * A drain's figures: events/s from the consumer's start (`t0`) to the last handled (`end`), and from the
 * first message on (the consumer's start left out), the time to the first message, the copies seen twice.
 */
export function drainMetrics(events: number, t0: number, first: number, end: number, handled: Handled): Record<string, number> {
  return {
    rate: rate(events, end - t0),
    handlerRate: rate(events, end - t0),
    steadyRate: rate(events, end - first),
    firstMessageMs: first - t0,
    duplicates: handled.duplicates,
  };
}

/** Counts distinct events handled (by seq); copies delivered again are counted apart. */
export class Handled {
  readonly counter = new Counter();
  readonly #seen = new Set<number>();
  duplicates = 0;
  add(seq: number): void {
    if (this.#seen.has(seq)) {
      this.duplicates++;
      return;
    }
    this.#seen.add(seq);
    this.counter.add();
  }
  until(n: number, timeoutMs: number): Promise<void> {
    return this.counter.until(n, timeoutMs, 'events handled');
  }
}
