/**
 * Commands with one owner on RabbitMQ (src/rabbitmq/owners.ts): the lock a subscription holds while it
 * records or checks a command's owner. A process killed while holding it leaves nothing behind (the lock is
 * an exclusive consumer, gone with its channel); one that holds it past the connect timeout makes a start
 * fail with a retryable error naming the lock, not hang. The rule itself is in the conformance suite.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import amqp from 'amqplib';
import { TidingsError } from '../src/index.ts';
import { Charge } from './fixtures/contracts.ts';
import { rabbitWorld, type Harness } from './fixtures/rabbitmq.ts';
import { RABBITMQ_URL, sleep, waitFor } from './helpers.ts';

/** Another process in the middle of a claim: an exclusive consumer on the command's lock, on a connection of its own. */
async function holdLock(h: Harness): Promise<{ release(): Promise<void> }> {
  const connection = await amqp.connect(RABBITMQ_URL);
  const channel = await connection.createChannel();
  const lock = `${h.prefix}${Charge.topic}:owner-lock`;
  await channel.assertQueue(lock, { durable: true, arguments: { 'x-queue-type': 'classic' } });
  await channel.consume(lock, () => undefined, { exclusive: true, noAck: true });
  return { release: () => connection.close() };
}

// A time limit: a broker restarted under the test (another test's fault injection) fails it instead of hanging the run.
test('a process killed while it claims a command leaves no lock: the next subscription waits for the lock, then owns the command', {
  timeout: 60_000,
}, async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const holder = await holdLock(h);
  const charged: number[] = [];
  const bus = h.bus('billing');
  bus.subscribe('billing', Charge, (message) => {
    charged.push(message.data.seq);
  });
  let started = false;
  const starting = bus.start().then(() => {
    started = true;
  });
  await sleep(1_000);
  assert.equal(started, false, 'it waits while another holds the lock');
  await holder.release(); // as a kill -9 would: the connection goes, and the exclusive consumer with it
  await starting;
  await bus.send(Charge, { key: 'k', seq: 1 });
  const other = h.bus('fraud');
  other.subscribe('fraud', Charge, () => undefined);
  await assert.rejects(other.start(), (error: unknown) => error instanceof TidingsError && error.code === 'SUBSCRIPTION_CONFLICT');
  await waitFor('the command handled', () => charged.length >= 1, 20_000);
  await sleep(300);
  assert.deepEqual(charged, [1], 'the owner handles its command');
});

test('a lock held past the connect timeout: the start fails with a retryable BACKBONE_UNAVAILABLE naming the lock, and nothing was declared', {
  timeout: 60_000,
}, async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const holder = await holdLock(h);
  try {
    const bus = h.bus('billing', { rabbit: { connectTimeoutMs: 1_000 } });
    bus.subscribe('billing', Charge, () => undefined);
    await assert.rejects(bus.start(), (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'BACKBONE_UNAVAILABLE', String(error));
      assert.equal(error.retryable, true);
      assert.match(error.message, new RegExp(`lock ${h.prefix.replaceAll('.', '\\.')}test\\.charge:owner-lock`));
      return true;
    });
    const connection = await amqp.connect(RABBITMQ_URL);
    try {
      const channel = await connection.createChannel();
      channel.on('error', () => undefined);
      await assert.rejects(channel.checkQueue(`${h.prefix}billing:p0`), /404/, 'no partition queue: the subscription was refused before it declared anything');
    } finally {
      await connection.close().catch(() => undefined);
    }
  } finally {
    await holder.release();
  }
});
