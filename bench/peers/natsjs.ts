/**
 * A plain nats.js client doing what Tidings on NATS does in workloads 2, 3 and 5, as a user without
 * Tidings would write it: one file-backed JetStream stream, `js.publish` awaiting the publish ack (JSON
 * payload, no other header) with a message id (`Nats-Msg-Id`), so that JetStream keeps one copy of a publish
 * retried within its duplicate window, as Tidings' publishes are kept (issue 24: the same guarantee on both
 * sides; without the id the server skips its duplicate check), one durable pull consumer with explicit acks and the same
 * max_ack_pending as Tidings' bucket consumers together (bench/load/brokers.ts), read with `consume()`,
 * each message parsed and acknowledged. No per-key order across processes, retries, dead letters or envelope.
 */
import { AckPolicy, connect, DeliverPolicy, nanos, RetentionPolicy, StorageType, type JetStreamClient, type JetStreamManager, type NatsConnection } from 'nats';
import {
  CHUNK,
  deleteNats,
  drainMetrics,
  Handled,
  NATS_MAX_ACK_PENDING,
  NATS_PROCESSES,
  NATS_STREAM_MARK,
  NATS_URL,
  natsUnacked,
  PRODUCERS,
  uniqueId,
} from '../load/brokers.ts';
import { runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { latencyPhases } from '../load/latency.ts';
import { now, produce, rate, warmedUp } from '../load/measure.ts';
import type { ChildResult, Task } from '../protocol.ts';

const id = uniqueId();
const stream = `${NATS_STREAM_MARK}plain_${id}`;
const subject = `tbench_plain_${id}.bench.event`;

interface Plain {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  publish(seq: number, keys: number): Promise<unknown>;
  /** Creates the durable consumer and reads it until `stop()`. */
  consume(deliver: DeliverPolicy, onMessage: (event: BenchEvent) => void): Promise<{ stop(): Promise<void> }>;
}

async function open(): Promise<Plain> {
  const nc = await connect({ servers: NATS_URL });
  const jsm = await nc.jetstreamManager();
  const js = nc.jetstream();
  await jsm.streams.add({ name: stream, subjects: [subject], storage: StorageType.File, retention: RetentionPolicy.Limits });
  return {
    nc,
    js,
    jsm,
    publish: (seq, keys) => js.publish(subject, JSON.stringify(makeEvent(seq, keys)), { msgID: `${id}-${seq}` }),
    consume: async (deliver, onMessage) => {
      await jsm.consumers.add(stream, {
        durable_name: 'bench',
        ack_policy: AckPolicy.Explicit,
        deliver_policy: deliver,
        ack_wait: nanos(10_000),
        max_ack_pending: NATS_MAX_ACK_PENDING,
      });
      const consumer = await js.consumers.get(stream, 'bench');
      const messages = await consumer.consume({ max_messages: 500 });
      const loop = (async () => {
        for await (const message of messages) {
          onMessage(message.json<BenchEvent>());
          message.ack();
        }
      })();
      return {
        stop: async () => {
          messages.stop();
          await loop;
        },
      };
    },
  };
}

/** Runs `body`, checks that the consumer acknowledged everything, and deletes the stream. */
async function guarded(body: (plain: Plain) => Promise<ChildResult>): Promise<ChildResult> {
  const plain = await open();
  try {
    const result = await body(plain);
    await plain.nc.flush();
    const left = await natsUnacked(stream);
    if (left > 0) throw new Error(`${left} message(s) left unacknowledged`);
    return result;
  } finally {
    await plain.nc.close().catch(() => undefined);
    await deleteNats([stream]);
  }
}

async function drain(task: Task): Promise<ChildResult> {
  return guarded(async (plain) => {
    for (let first = 0; first < task.events; first += CHUNK) {
      await Promise.all(Array.from({ length: Math.min(CHUNK, task.events - first) }, (_, i) => plain.publish(first + i, task.variant.keys)));
    }
    const handled = new Handled();
    let first = 0;
    const t0 = now();
    const reader = await plain.consume(DeliverPolicy.All, (event) => {
      first ||= now();
      handled.add(event.seq);
    });
    await handled.until(task.events, task.timeoutMs);
    const end = now();
    await reader.stop();
    return { ok: true, metrics: drainMetrics(task.events, t0, first, end, handled) };
  });
}

async function endToEnd(task: Task): Promise<ChildResult> {
  return guarded(async (plain) => {
    const handled = new Handled();
    const reader = await plain.consume(DeliverPolicy.New, (event) => handled.add(event.seq));
    const t0 = now();
    await produce(task.events, PRODUCERS, (seq) => plain.publish(seq, task.variant.keys));
    const producedMs = now() - t0;
    await handled.until(task.events, task.timeoutMs);
    const ms = now() - t0;
    await reader.stop();
    return { ok: true, metrics: { rate: rate(task.events, ms), producerRate: rate(task.events, producedMs), duplicates: handled.duplicates } };
  });
}

async function latency(task: Task): Promise<ChildResult> {
  return guarded(async (plain) => {
    const handled = new Handled();
    let probe = (_seq: number): void => undefined;
    const reader = await plain.consume(DeliverPolicy.New, (event) => {
      probe(event.seq);
      handled.add(event.seq);
    });
    const { metrics, series } = await latencyPhases(
      task,
      NATS_PROCESSES,
      (seq) => plain.publish(seq, task.variant.keys),
      (fn) => {
        probe = fn;
      },
    );
    await reader.stop();
    metrics.duplicates = handled.duplicates;
    return { ok: true, metrics, series };
  });
}

runChild({ drain: warmedUp(drain), e2e: endToEnd, latency });
