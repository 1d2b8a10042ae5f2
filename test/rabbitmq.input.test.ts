/**
 * Hostile and foreign input on the RabbitMQ backbone (issue 18): messages RabbitMQ can never accept fail at
 * once in `publish`, and CloudEvents from plain AMQP producers keep what their first delivery derived when
 * they go through a delayed retry, a dead letter and a redrive.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import amqp from 'amqplib';
import { keyHash } from '../src/index.ts';
import { routingKey } from '../src/rabbitmq/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { RABBITMQ_URL, requireBroker, waitFor } from './helpers.ts';
import { Harness, warnings } from './rabbitmq.helpers.ts';

const harnesses: Harness[] = [];
after(async () => {
  for (const harness of harnesses) await harness.cleanup();
});

function harness(): Harness {
  const h = new Harness();
  harnesses.push(h);
  return h;
}

test('a CloudEvent from a plain producer without the optional attributes keeps its topic, key, time and correlation id through a delayed retry, a dead letter and a redrive', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return;
  const h = harness();
  const bus = h.bus('interop');
  const seen: Array<{ attempt: number; topic: string; key: string; time: string; correlationId: string }> = [];
  let failUntil = 2;
  bus.subscribe(
    'interop',
    Ticked,
    (message, ctx) => {
      seen.push({ attempt: ctx.attempt, topic: message.topic, key: message.key, time: message.time.toISOString(), correlationId: message.correlationId });
      if (ctx.attempt <= failUntil) throw new Error(`failure ${ctx.attempt}`);
    },
    { partitions: 2, retry: { immediate: 0, delayed: [100], jitter: 0 } },
  );
  await bus.start();
  const connection = await amqp.connect(RABBITMQ_URL);
  t.after(() => connection.close());
  const channel = await connection.createConfirmChannel();
  // Only the required attributes: no cloudEvents:topic, partitionkey, time, correlationid; no timestamp.
  channel.publish(`${h.prefix}test.ticked`, routingKey(keyHash('plain-1')), Buffer.from('{"key": "plain", "seq": 1}'), {
    contentType: 'application/json',
    headers: { 'cloudEvents:specversion': '1.0', 'cloudEvents:id': 'plain-1', 'cloudEvents:source': 'plain-producer', 'cloudEvents:type': 'test.ticked.v1' },
  });
  await channel.waitForConfirms();

  // Attempt 1 fails, attempt 2 comes back from the delay queue and fails: a dead letter (1 delayed retry).
  await waitFor('two attempts', () => seen.length === 2, 10_000);
  const store = bus.backbone.deadLetters();
  await waitFor('the dead letter', async () => (await store.count({ subscription: 'interop' })) === 1, 10_000);
  const [dead] = await store.show('plain-1');
  assert.ok(dead, 'dead-lettered after its retries');
  assert.match(dead.reason, /failed 2 attempts; last error: failure 2/, 'dead-lettered by its handler, not as undecodable');
  assert.equal(dead.topic, 'test.ticked', 'the dead letter knows its topic');
  assert.equal(dead.key, 'plain-1');
  assert.deepEqual(dead.attempts.map((a) => a.attempt), [1, 2]);

  failUntil = 0;
  assert.equal((await store.redrive({ ids: ['plain-1'] })).count, 1);
  await waitFor('the redriven attempt', () => seen.length === 3, 10_000);
  assert.deepEqual(seen.map((s) => s.attempt), [1, 2, 1], 'redrive resets the attempts');
  for (const s of seen) {
    assert.equal(s.topic, 'test.ticked');
    assert.equal(s.key, 'plain-1', 'the key derived from the id stays');
    assert.equal(s.correlationId, 'plain-1');
    assert.equal(s.time, seen[0]!.time, 'the time derived on the first delivery stays');
  }
  assert.ok(!warnings.some((w) => w.includes('plain-1') && w.includes('cannot be decoded')), 'never taken for undecodable');
});
