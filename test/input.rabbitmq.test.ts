/**
 * Hostile and foreign input on the RabbitMQ backbone (issue 18): messages RabbitMQ can never accept fail at
 * once in `publish`, and CloudEvents from plain AMQP producers keep what their first delivery derived when
 * they go through a delayed retry, a dead letter and a redrive.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import amqp from 'amqplib';
import { keyHash, TidingsError } from '../src/index.ts';
import type { Outgoing } from '../src/core/backbone.ts';
import type { Envelope } from '../src/core/envelope.ts';
import type { BrokerBackbone } from '../src/outbox/index.ts';
import { amqpLimits, historyHeader } from '../src/rabbitmq/codec.ts';
import { RabbitBroker, routingKey } from '../src/rabbitmq/index.ts';
import { foreignTick, Ticked, ticksSeen } from './fixtures/contracts.ts';
import { RABBITMQ_URL, sleep, waitFor } from './helpers.ts';
import { rabbitWorld, testOptions, warnings } from './fixtures/rabbitmq.ts';

/** A message as a producer that checks nothing would hand it to the broker (raw SQL in an outbox, an older version). */
function outgoing(seq: number, overrides: Partial<Envelope> = {}, json = JSON.stringify({ key: 'k', seq })): Outgoing {
  const envelope = foreignTick('k', JSON.parse(json.length > 1_000 ? '{}' : json) as unknown, overrides);
  return { envelope, json, keyHash: keyHash(envelope.partitionkey) };
}

async function refusal(publish: Promise<void>): Promise<{ error: TidingsError; ms: number }> {
  const started = Date.now();
  const error = await publish.then(
    () => undefined,
    (caught: unknown) => caught,
  );
  assert.ok(error instanceof TidingsError, `refused with a TidingsError (got ${String(error)})`);
  return { error, ms: Date.now() - started };
}

test('a message RabbitMQ can never take fails at once in publish, for good, naming the limit, the message and its topic; the channel goes on', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const bus = h.bus('reader');
  const seen = await ticksSeen(bus, 'reader');
  // The broker alone, as the outbox relay uses it: past the bus' own checks. publishTimeoutMs is 15 s here.
  const broker = new RabbitBroker(testOptions(h.prefix));
  t.after(() => broker.close());
  const cases: Array<[string, Outgoing, string, RegExp]> = [
    [
      'an id of 256 bytes',
      outgoing(1, { id: 'i'.repeat(256) }),
      'LIMIT_EXCEEDED',
      /its id is 256 bytes, over the limit of 255 \(AMQP carries it in message_id/,
    ],
    ['an id of 100 three-byte characters', outgoing(2, { id: '€'.repeat(100) }), 'LIMIT_EXCEEDED', /its id is 300 bytes/],
    [
      'a key of 70 kB',
      outgoing(3, { partitionkey: 'k'.repeat(70_000) }),
      'LIMIT_EXCEEDED',
      /headers are \d+ bytes, over the limit of 65536 .*cloudEvents:partitionkey, is 70004 bytes/,
    ],
    ['a source of 1 MB', outgoing(4, { source: 's'.repeat(1_000_000) }), 'LIMIT_EXCEEDED', /over the limit of 65536 .*cloudEvents:source/],
    ['an attribute the client cannot encode', outgoing(5, { tenant: 10n as never }), 'INVALID_PAYLOAD', /cannot be encoded for RabbitMQ: .*bigint/],
  ];
  for (const [index, [what, message, code, pattern]] of cases.entries()) {
    const { error, ms } = await refusal(broker.publish([message]));
    assert.equal(error.code, code, what);
    assert.equal(error.retryable, false, `${what}: not worth publishing again`);
    assert.match(error.message, pattern, what);
    assert.match(error.message, /on test\.ticked/, `${what}: names the topic`);
    assert.ok(
      error.ref?.id !== undefined && error.ref.id.length <= 303 && message.envelope.id.startsWith(error.ref.id.slice(0, 200)),
      `${what}: names the message`,
    );
    assert.ok(ms < 1_000, `${what}: at once (${ms} ms)`);
    await broker.publish([outgoing(100 + index)]);
  }
  await waitFor('the good messages published after each refusal', () => seen.length === cases.length, 10_000);

  // Over the server's max_message_size (128 MiB by default on RabbitMQ 3, 16 MiB on 4): the server refuses it,
  // and the others of the call go.
  const huge = `"${'x'.repeat(134_217_728)}"`;
  const { error, ms } = await refusal(broker.publish([outgoing(6), outgoing(7, {}, huge), outgoing(8)]));
  assert.equal(error.code, 'LIMIT_EXCEEDED');
  assert.equal(error.retryable, false);
  assert.match(error.message, /it is 134217730 bytes, over the server's limit of \d+ \(max_message_size\)/);
  t.diagnostic(`the oversized message refused in ${ms} ms`);
  await waitFor('the two others of that call', () => seen.includes(6) && seen.includes(8), 10_000);
  // Known now: the next one is refused before it is sent.
  const again = await refusal(broker.publish([outgoing(9, {}, huge)]));
  assert.equal(again.error.code, 'LIMIT_EXCEEDED');
  assert.ok(again.ms < 1_000);
  await broker.publish([outgoing(10)]);
  await waitFor('a message after them all', () => seen.includes(10), 10_000);
  assert.ok(!seen.includes(7) && !seen.includes(9));
});

test('the relay sets aside an outbox message RabbitMQ refuses for good (a dead letter of tidings-relay with the reason), and the messages behind it flow', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  const bus = h.bus('relayed', { outbox: true, rabbit: { relay: { partitions: 1 } } });
  const seen = await ticksSeen(bus, 'relayed');
  const backbone = bus.backbone as BrokerBackbone;
  // Written to the outbox as raw SQL or an older version would: within the core's limits, over AMQP's.
  const poison = outgoing(2, { source: 's'.repeat(100_000) });
  await bus.transaction(async (tx) => {
    await bus.publish(Ticked, { key: 'k', seq: 1 }, { tx });
    await backbone.publish([poison], tx);
    await bus.publish(Ticked, { key: 'k', seq: 3 }, { tx });
  });
  await waitFor('the messages around it', () => seen.length === 2, 15_000);
  assert.deepEqual(seen, [1, 3]);
  const letters = await backbone.outbox!.deadLetters().list({ subscription: 'tidings-relay' });
  assert.equal(letters.total, 1);
  assert.equal(letters.deadLetters[0]!.messageId, poison.envelope.id);
  assert.match(letters.deadLetters[0]!.reason, /refused message .* for good: .*headers are \d+ bytes, over the limit of 65536/);
  await sleep(200);
  assert.deepEqual(seen, [1, 3]);
});

test("attempt histories are cut to fit a message's headers, the newest attempts kept", () => {
  const record = (attempt: number) => ({
    attempt,
    at: new Date().toISOString(),
    error: { name: 'Error', message: '€'.repeat(5_000), stack: '€'.repeat(5_000) },
  });
  const header = historyHeader(Array.from({ length: 30 }, (_, i) => record(i + 1)));
  const kept = JSON.parse(header) as Array<{ attempt: number }>;
  assert.ok(Buffer.byteLength(header) <= amqpLimits.headerBytes / 2, `${Buffer.byteLength(header)} bytes`);
  assert.ok(kept.length >= 1);
  assert.equal(kept.at(-1)!.attempt, 30, 'the newest kept');
  const one = JSON.parse(historyHeader([{ attempt: 1, at: '', error: { name: 'Error', message: '€'.repeat(100_000) } }])) as unknown[];
  assert.equal(one.length, 1, 'a single huge attempt is kept, cut');
});

test('a CloudEvent from a plain producer without the optional attributes keeps its topic, key, time and correlation id through a delayed retry, a dead letter and a redrive', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
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
  assert.deepEqual(
    dead.attempts.map((a) => a.attempt),
    [1, 2],
  );

  failUntil = 0;
  assert.equal((await store.redrive({ ids: ['plain-1'] })).count, 1);
  await waitFor('the redriven attempt', () => seen.length === 3, 10_000);
  assert.deepEqual(
    seen.map((s) => s.attempt),
    [1, 2, 1],
    'redrive resets the attempts',
  );
  for (const s of seen) {
    assert.equal(s.topic, 'test.ticked');
    assert.equal(s.key, 'plain-1', 'the key derived from the id stays');
    assert.equal(s.correlationId, 'plain-1');
    assert.equal(s.time, seen[0]!.time, 'the time derived on the first delivery stays');
  }
  assert.ok(!warnings.some((w) => w.includes('plain-1') && w.includes('cannot be decoded')), 'never taken for undecodable');
});
