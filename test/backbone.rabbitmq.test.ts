/**
 * The RabbitMQ backbone end to end through createBus, on a real RabbitMQ (and PostgreSQL for the outbox).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import amqp from 'amqplib';
import { z } from 'zod';
import { defineEvent, deadLetter, keyHash, type Message } from '../src/index.ts';
import { partitionPatterns, routingKey } from '../src/rabbitmq/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { RABBITMQ_URL, sleep, waitFor } from './helpers.ts';
import { rabbitWorld, warnings } from './fixtures/rabbitmq.ts';

const Noted = defineEvent('test.noted', { schema: z.object({ key: z.string(), text: z.string() }), key: (data) => data.key });

test('publish, publishMany and subscribe across two topics of one subscription, in per-key order', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const bus = h.bus('basic');
  const seen: string[] = [];
  bus
    .subscription('reader', { concurrency: 4 })
    .on(Ticked, (message) => {
      seen.push(`${message.data.key}:tick:${message.data.seq}`);
    })
    .on(Noted, (message) => {
      seen.push(`${message.data.key}:note:${message.data.text}`);
    });
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1 });
  await bus.publish(Noted, { key: 'a', text: 'x' });
  await bus.publishMany(Ticked, [
    { key: 'a', seq: 2 },
    { key: 'b', seq: 1 },
    { key: 'a', seq: 3 },
  ]);
  await waitFor('5 messages', () => seen.length === 5);
  assert.deepEqual(
    seen.filter((s) => s.startsWith('a:')),
    ['a:tick:1', 'a:note:x', 'a:tick:2', 'a:tick:3'],
  );
  await sleep(100);
  assert.equal(seen.length, 5, 'nothing delivered twice');
  assert.deepEqual(bus.stats().subscriptions.reader, { handled: 5, retried: 0, deadLettered: 0 });
});

test('interop: a plain amqplib consumer bound with # reads CloudEvents headers and the data JSON', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const bus = h.bus('orders');
  bus.subscribe('declares-the-exchange', Ticked, () => undefined);
  await bus.start();
  const connection = await amqp.connect(RABBITMQ_URL);
  t.after(() => connection.close());
  const channel = await connection.createChannel();
  const { queue } = await channel.assertQueue('', { exclusive: true });
  await channel.bindQueue(queue, `${h.prefix}test.ticked`, '#');
  const received = new Promise<amqp.ConsumeMessage>((resolve) => {
    void channel.consume(queue, (message) => message && resolve(message), { noAck: true });
  });
  const sent = await bus.publish(Ticked, { key: 'k-1', seq: 7 }, { tenant: 'acme', subject: 'tick/7' });
  const message = await received;
  const headers = message.properties.headers ?? {};
  assert.equal(message.properties.contentType, 'application/json');
  assert.equal(message.properties.messageId, sent.id);
  assert.equal(message.properties.deliveryMode, 2, 'persistent');
  assert.deepEqual(JSON.parse(message.content.toString()), { key: 'k-1', seq: 7 }, 'the body is the data alone');
  assert.equal(headers['cloudEvents:specversion'], '1.0');
  assert.equal(headers['cloudEvents:id'], sent.id);
  assert.equal(headers['cloudEvents:source'], 'tidings://orders');
  assert.equal(headers['cloudEvents:type'], 'test.ticked.v1');
  assert.equal(headers['cloudEvents:subject'], 'tick/7');
  assert.equal(headers['cloudEvents:tenant'], 'acme');
  assert.equal(headers['cloudEvents:partitionkey'], 'k-1');
  assert.ok(!Number.isNaN(Date.parse(headers['cloudEvents:time'] as string)));
  assert.equal(message.fields.routingKey, routingKey(keyHash('k-1')), 'routed by the key bucket');
  assert.match(message.fields.routingKey, /^[01](\.[01]){9}$/);
});

test('with an outbox: a rolled-back transaction publishes nothing, a committed one arrives through the relay', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  const bus = h.bus('tx', { outbox: true });
  const seen: number[] = [];
  bus.subscribe('reader', Ticked, async (message, ctx) => {
    await ctx.tx.query('select 1');
    seen.push(message.data.seq);
  });
  await bus.start();
  await assert.rejects(
    bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'k', seq: 1 }, { tx });
      throw new Error('roll back');
    }),
    /roll back/,
  );
  await bus.transaction(async (tx) => {
    await bus.publish(Ticked, { key: 'k', seq: 2 }, { tx });
  });
  await waitFor('the committed message', () => seen.length === 1);
  await sleep(300);
  assert.deepEqual(seen, [2]);
});

test('per-key order over 100 keys with two buses sharing the subscription and concurrent publishers; none lost, also when the active bus stops mid-stream', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const keys = 100;
  const perKey = 20;
  const handled = new Map<string, number[]>();
  const byBus = [0, 0];
  const publisher = h.bus('publisher');
  const buses = [h.bus('worker-1'), h.bus('worker-2')];
  buses.forEach((bus, index) => {
    bus.subscribe(
      'ordered',
      Ticked,
      async (message) => {
        const list = handled.get(message.data.key) ?? [];
        list.push(message.data.seq);
        handled.set(message.data.key, list);
        byBus[index]!++;
        if (message.data.seq % 7 === 0) await sleep(1);
      },
      { concurrency: 16, partitions: 4, inbox: false },
    );
  });
  // worker-1 starts first: it is the single active consumer of every partition; worker-2 waits.
  await buses[0]!.start();
  await buses[1]!.start();
  await publisher.start();
  const started = Date.now();
  const total = () => [...handled.values()].reduce((n, list) => n + list.length, 0);
  let stoppedAt = -1;
  // Four publishers, each owning a quarter of the keys, publishing in order per key but all at once.
  await Promise.all(
    [0, 1, 2, 3].map(async (p) => {
      for (let seq = 1; seq <= perKey; seq++) {
        const batch = [];
        for (let k = p; k < keys; k += 4) batch.push(publisher.publish(Ticked, { key: `key-${k}`, seq }));
        await Promise.all(batch);
        if (seq === perKey / 2 && p === 0) {
          // Graceful stop of the active worker mid-stream: worker-2 takes over every partition.
          await buses[0]!.stop();
          stoppedAt = total();
        }
      }
    }),
  );
  await waitFor('every message', () => total() >= keys * perKey, 30_000);
  const elapsed = Date.now() - started;
  await sleep(200);
  for (let k = 0; k < keys; k++) {
    const list = handled.get(`key-${k}`) ?? [];
    assert.deepEqual(
      list,
      Array.from({ length: perKey }, (_, i) => i + 1),
      `order and completeness of key-${k}`,
    );
  }
  assert.equal(total(), keys * perKey, 'none lost, none twice');
  assert.ok(byBus[0]! > 0 && byBus[1]! > 0, `both workers handled messages (${byBus.join(' / ')})`);
  t.diagnostic(`${total()} messages handled in ${elapsed} ms; per worker ${byBus.join(' / ')}; worker-1 stopped after ${stoppedAt}`);
});

test('retries: immediate then delayed, the key held meanwhile while other keys flow; then a dead letter with its history; redrive delivers it once', async (t) => {
  const h = await rabbitWorld(t, { postgres: true });
  if (h === undefined) return;
  const bus = h.bus('retries', { outbox: true });
  const events: string[] = [];
  const attempts = new Map<number, number[]>();
  let poisonFixed = false;
  let effects = 0;
  bus.subscribe(
    'flaky',
    Ticked,
    async (message, ctx) => {
      const { key, seq } = message.data;
      attempts.set(seq, [...(attempts.get(seq) ?? []), ctx.attempt]);
      if (key === 'flaky' && seq === 1 && ctx.attempt < 4) throw new Error(`flaky failure ${ctx.attempt}`);
      if (key === 'poison' && !poisonFixed) throw new Error(`poison failure ${ctx.attempt}`);
      if (key === 'dead' && seq === 30) return deadLetter('refused by the handler');
      await ctx.tx.query('select 1');
      effects++;
      events.push(`${key}:${seq}`);
    },
    { concurrency: 4, retry: { immediate: 1, delayed: [150, 300], jitter: 0 } },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'flaky', seq: 1 });
  await bus.publish(Ticked, { key: 'flaky', seq: 2 });
  await bus.publish(Ticked, { key: 'other', seq: 10 });
  await waitFor('flaky 1 and 2', () => events.includes('flaky:2'), 10_000);
  assert.deepEqual(attempts.get(1), [1, 2, 3, 4], 'attempt counts across the delay queues');
  assert.ok(events.indexOf('other:10') < events.indexOf('flaky:1'), 'another key was not held');
  assert.ok(events.indexOf('flaky:1') < events.indexOf('flaky:2'), 'the later message of the held key waited');

  // A poison message: 1 + 1 immediate + 2 delayed attempts, then a dead letter; its key's next message goes on.
  const poison = await bus.publish(Ticked, { key: 'poison', seq: 20 });
  await bus.publish(Ticked, { key: 'poison-next', seq: 21 });
  await bus.publish(Ticked, { key: 'dead', seq: 30 });
  await waitFor('the dead letters', () => (bus.stats().subscriptions.flaky?.deadLettered ?? 0) === 2, 10_000);
  const store = bus.backbone.deadLetters();
  const listed = await store.list({ subscription: 'flaky' });
  assert.equal(listed.total, 2);
  const [dead] = await store.show(poison.id);
  assert.ok(dead);
  assert.equal(dead.messageId, poison.id);
  assert.equal(dead.topic, 'test.ticked');
  assert.equal(dead.key, 'poison');
  assert.match(dead.reason, /failed 4 attempts; last error: poison failure 4/);
  assert.deepEqual(
    dead.attempts.map((a) => [a.attempt, a.error.message]),
    [1, 2, 3, 4].map((n) => [n, `poison failure ${n}`]),
  );
  assert.ok(dead.attempts[0]!.error.stack?.includes('poison failure 1'));
  assert.deepEqual(dead.envelope.data, { key: 'poison', seq: 20 });
  assert.equal(await store.count({ errorText: 'refused by the handler' }), 1);

  // Redrive the poison message once the handler is fixed: handled exactly once, even when redriven twice.
  poisonFixed = true;
  const before = effects;
  const redriven = await store.redrive({ ids: [poison.id] });
  assert.equal(redriven.count, 1);
  assert.deepEqual(redriven.messageIds, [poison.id]);
  await waitFor('the redriven message', () => events.includes('poison:20'), 10_000);
  assert.equal(effects, before + 1);
  assert.equal(await store.count({ subscription: 'flaky' }), 1, 'the other dead letter stays');
  const dropped = await store.drop({ all: true });
  assert.equal(dropped.count, 1);
  assert.equal(await store.count({ all: true }), 0);
});

test('an undecodable message from a plain client is dead-lettered with a clear reason, and the consumer goes on', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  const bus = h.bus('robust');
  const seen: Message<{ key: string; seq: number }>[] = [];
  bus.subscribe('robust', Ticked, (message) => {
    seen.push(message);
  });
  await bus.start();
  const connection = await amqp.connect(RABBITMQ_URL);
  t.after(() => connection.close());
  const channel = await connection.createConfirmChannel();
  const exchange = `${h.prefix}test.ticked`;
  channel.publish(exchange, routingKey(keyHash('raw')), Buffer.from('{"key": "raw", "seq": 1}'), { messageId: 'no-attributes' });
  channel.publish(exchange, routingKey(keyHash('bad')), Buffer.from('not json {'), {
    messageId: 'bad-body',
    contentType: 'application/json',
    headers: { 'cloudEvents:specversion': '1.0', 'cloudEvents:id': 'bad-body', 'cloudEvents:source': 'plain', 'cloudEvents:type': 'test.ticked.v1' },
  });
  // A plain client that follows the binding is understood (cloudEvents_ prefix too).
  channel.publish(exchange, routingKey(keyHash('plain')), Buffer.from('{"key": "plain", "seq": 3}'), {
    contentType: 'application/json',
    headers: { cloudEvents_specversion: '1.0', cloudEvents_id: 'plain-ok', cloudEvents_source: 'plain', cloudEvents_type: 'test.ticked.v1' },
  });
  await channel.waitForConfirms();
  await bus.publish(Ticked, { key: 'after', seq: 4 });
  await waitFor('the good messages', () => seen.length === 2);
  assert.deepEqual(seen.map((m) => m.id).sort(), ['plain-ok', seen.find((m) => m.data.key === 'after')!.id].sort());
  const store = bus.backbone.deadLetters();
  await waitFor('two dead letters', async () => (await store.count({ subscription: 'robust' })) === 2);
  const { deadLetters } = await store.list({ subscription: 'robust' });
  const reasons = Object.fromEntries(deadLetters.map((d) => [d.messageId, d.reason]));
  assert.match(
    reasons['no-attributes']!,
    /UNDECODABLE_MESSAGE: message no-attributes in queue .*robust:p\d cannot be decoded: missing CloudEvents attributes specversion, source, type/,
  );
  assert.match(reasons['bad-body']!, /UNDECODABLE_MESSAGE: message bad-body in queue .*robust:p\d cannot be decoded: the body is not JSON/);
  assert.ok(
    warnings.some((w) => w.includes('bad-body')),
    'the operator is told',
  );
});

test('a key held by a delayed retry keeps its later messages in order even when they outgrow the prefetch window (parked in the delay queue)', async (t) => {
  const h = await rabbitWorld(t);
  if (h === undefined) return;
  // prefetch 4 per partition, 1 partition: at most 2 messages wait in memory behind the held key. Classic
  // queues here, so that they are covered too.
  const bus = h.bus('parking', { rabbit: { prefetch: 4, quorum: false } });
  const order: string[] = [];
  let failed = false;
  bus.subscribe(
    'parking',
    Ticked,
    (message) => {
      if (message.data.key === 'held' && message.data.seq === 1 && !failed) {
        failed = true;
        throw new Error('once');
      }
      order.push(`${message.data.key}:${message.data.seq}`);
    },
    { partitions: 1, concurrency: 2, retry: { immediate: 0, delayed: [400], jitter: 0 } },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'held', seq: 1 });
  for (let seq = 2; seq <= 15; seq++) {
    await bus.publishMany(Ticked, [
      { key: 'held', seq },
      { key: `free-${seq}`, seq },
    ]);
  }
  await waitFor('every message', () => order.length === 29, 15_000);
  const held = order.filter((o) => o.startsWith('held:'));
  assert.deepEqual(
    held,
    Array.from({ length: 15 }, (_, i) => `held:${i + 1}`),
    'the held key kept its order',
  );
  assert.ok(order.indexOf('free-15:15') < order.indexOf('held:1'), 'other keys flowed past the held key');
  await sleep(200);
  assert.equal(order.length, 29, 'nothing twice');
  assert.ok(!warnings.some((w) => w.includes('did not come back')), 'no place was given up');
});

test('routing keys and partition bindings: every bucket lands in exactly the partition keyHash % partitions names', () => {
  // A topic pattern of this shape: '#' (everything), '#.<words>' (the last words), or an exact key.
  const matches = (pattern: string, key: string) => pattern === '#' || pattern === key || (pattern.startsWith('#.') && key.endsWith(pattern.slice(1)));
  for (const partitions of [1, 2, 3, 4, 8, 12]) {
    const patterns = partitionPatterns(partitions);
    for (let bucket = 0; bucket < 1_024; bucket += 7) {
      const key = routingKey(bucket);
      const hit = patterns.filter(([, pattern]) => matches(pattern, key)).map(([p]) => p);
      assert.deepEqual([...new Set(hit)], [bucket % partitions], `bucket ${bucket} of ${partitions} partitions`);
    }
  }
});
