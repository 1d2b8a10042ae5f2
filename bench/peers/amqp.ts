/**
 * A plain amqplib client doing what Tidings on RabbitMQ does in workloads 2, 3 and 5, as a user without
 * Tidings would write it: one topic exchange, one durable quorum queue bound with `#`, persistent messages
 * (JSON body) on a confirm channel, a consumer that parses the body and acknowledges each message by hand
 * with the same prefetch window Tidings uses in total (bench/load/brokers.ts). No per-key order,
 * retries, dead letters or envelope.
 */
import amqp, { type Channel, type ChannelModel, type ConfirmChannel } from 'amqplib';
import {
  AMQP_PREFETCH,
  CHUNK,
  deleteRabbit,
  drainMetrics,
  Handled,
  PRODUCERS,
  RABBITMQ_PROCESSES,
  RABBITMQ_URL,
  rabbitReady,
  uniqueId,
} from '../load/brokers.ts';
import { runChild } from '../load/child.ts';
import { makeEvent, type BenchEvent } from '../load/events.ts';
import { latencyPhases } from '../load/latency.ts';
import { now, produce, rate, sleep, warmedUp } from '../load/measure.ts';
import type { ChildResult, Task } from '../protocol.ts';

const prefix = `tbench.plain.${uniqueId()}.`;
const exchange = `${prefix}bench.event`;
const queue = `${prefix}queue`;

interface Plain {
  connection: ChannelModel;
  publisher: ConfirmChannel;
  publish(seq: number, keys: number): Promise<void>;
  consume(onMessage: (event: BenchEvent) => void): Promise<Channel>;
}

async function open(): Promise<Plain> {
  const connection = await amqp.connect(RABBITMQ_URL);
  const publisher = await connection.createConfirmChannel();
  await publisher.assertExchange(exchange, 'topic', { durable: true });
  await publisher.assertQueue(queue, { durable: true, arguments: { 'x-queue-type': 'quorum' } });
  await publisher.bindQueue(queue, exchange, '#');
  return {
    connection,
    publisher,
    publish: (seq, keys) =>
      new Promise<void>((resolve, reject) => {
        const body = Buffer.from(JSON.stringify(makeEvent(seq, keys)));
        publisher.publish(exchange, 'bench.event', body, { persistent: true, contentType: 'application/json' }, (error: unknown) =>
          error ? reject(error) : resolve(),
        );
      }),
    consume: async (onMessage) => {
      const channel = await connection.createChannel();
      await channel.prefetch(AMQP_PREFETCH);
      await channel.consume(
        queue,
        (message) => {
          if (message === null) return;
          onMessage(JSON.parse(message.content.toString()) as BenchEvent);
          channel.ack(message);
        },
        { noAck: false },
      );
      return channel;
    },
  };
}

/**
 * A quorum queue applies acknowledgements asynchronously; a consumer channel closed at once can be
 * processed before its last acks, which then come back as unacknowledged (RabbitMQ redelivers them: at
 * least once). After the timed part, a pause, so that the check sees what the consumer did.
 */
async function settleAndClose(channel: Channel): Promise<void> {
  await sleep(500);
  await channel.close();
}

/** Runs `body`, checks that the queue holds nothing once the consumer's channel is closed, and removes the queue. */
async function guarded(body: (plain: Plain) => Promise<ChildResult>): Promise<ChildResult> {
  const plain = await open();
  try {
    const result = await body(plain);
    await plain.connection.close();
    const left = await rabbitReady([queue]);
    if (left > 0) throw new Error(`${left} message(s) left unacknowledged`);
    return result;
  } finally {
    await plain.connection.close().catch(() => undefined);
    await deleteRabbit([queue], [exchange]);
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
    const channel = await plain.consume((event) => {
      first ||= now();
      handled.add(event.seq);
    });
    await handled.until(task.events, task.timeoutMs);
    const end = now();
    await settleAndClose(channel);
    return { ok: true, metrics: drainMetrics(task.events, t0, first, end, handled) };
  });
}

async function endToEnd(task: Task): Promise<ChildResult> {
  return guarded(async (plain) => {
    const handled = new Handled();
    const channel = await plain.consume((event) => handled.add(event.seq));
    const t0 = now();
    await produce(task.events, PRODUCERS, (seq) => plain.publish(seq, task.variant.keys));
    const producedMs = now() - t0;
    await handled.until(task.events, task.timeoutMs);
    const ms = now() - t0;
    await settleAndClose(channel);
    return { ok: true, metrics: { rate: rate(task.events, ms), producerRate: rate(task.events, producedMs), duplicates: handled.duplicates } };
  });
}

async function latency(task: Task): Promise<ChildResult> {
  return guarded(async (plain) => {
    const handled = new Handled();
    let probe = (_seq: number): void => undefined;
    const channel = await plain.consume((event) => {
      probe(event.seq);
      handled.add(event.seq);
    });
    const { metrics, series } = await latencyPhases(
      task,
      RABBITMQ_PROCESSES,
      (seq) => plain.publish(seq, task.variant.keys),
      (fn) => {
        probe = fn;
      },
    );
    await settleAndClose(channel);
    metrics.duplicates = handled.duplicates;
    return { ok: true, metrics, series };
  });
}

runChild({ drain: warmedUp(drain), e2e: endToEnd, latency });
