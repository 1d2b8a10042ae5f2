/** The core alone: contracts, validation, options, retry schedule, ids and keys. No server needed. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import {
  createBus,
  defineCommand,
  defineEvent,
  keyHash,
  newId,
  nextRetryDelay,
  partitionOf,
  resolveSubscribeOptions,
  TidingsError,
  validate,
  ValidationError,
  type Backbone,
  type Outgoing,
} from '../src/index.ts';

const Placed = defineEvent('orders.order-placed', {
  version: 2,
  schema: z.object({ orderId: z.string(), lines: z.array(z.object({ sku: z.string(), qty: z.number().int().positive() })) }),
  key: (order) => order.orderId,
  description: 'An order was placed',
});

test('a contract carries its name, version, CloudEvents type and topic', () => {
  assert.equal(Placed.kind, 'event');
  assert.equal(Placed.type, 'orders.order-placed.v2');
  assert.equal(Placed.topic, 'orders.order-placed');
  assert.equal(Placed.key!({ orderId: 'o-1', lines: [] }), 'o-1');
  assert.equal(defineCommand('billing.charge-card', { schema: z.object({}) }).kind, 'command');
});

test('contract names are validated: no quotes, spaces, semicolons or unicode', () => {
  for (const name of ['Orders', 'a b', "x';drop table y;--", 'ünïcode', '', 'a..b', '.a', 'x'.repeat(201)]) {
    assert.throws(
      () => defineEvent(name, { schema: z.object({}) }),
      (error: unknown) => error instanceof TidingsError && error.code === 'INVALID_CONTRACT',
      name,
    );
  }
  assert.throws(() => defineEvent('a.b', { schema: z.object({}), version: 0 }), /version must be a positive integer/);
  assert.throws(() => defineEvent('a.b', { schema: {} as never }), /must be a Standard Schema/);
});

test('validation names every bad field by its path and the contract', async () => {
  const error = await validate(Placed, { orderId: 7, lines: [{ sku: 'a', qty: 0 }] }).catch((e: unknown) => e);
  assert.ok(error instanceof ValidationError);
  assert.equal(error.contract, 'orders.order-placed');
  assert.deepEqual(error.issues.map((issue) => issue.path).sort(), ['lines.0.qty', 'orderId']);
  assert.match(error.message, /^Payload for orders\.order-placed is invalid: /);
  assert.deepEqual(await validate(Placed, { orderId: 'o', lines: [] }), { orderId: 'o', lines: [] });
});

test('the retry schedule: immediate retries, then each delay with bounded jitter, then give up', () => {
  const retry = { immediate: 2, delayed: [1_000, 10_000], jitter: 0.1 };
  assert.equal(nextRetryDelay(retry, 1), 0);
  assert.equal(nextRetryDelay(retry, 2), 0);
  assert.equal(
    nextRetryDelay(retry, 3, () => 0),
    900,
  );
  assert.equal(
    nextRetryDelay(retry, 3, () => 1),
    1_100,
  );
  assert.equal(
    nextRetryDelay(retry, 4, () => 0.5),
    10_000,
  );
  assert.equal(nextRetryDelay(retry, 5), undefined);
  assert.equal(nextRetryDelay({ immediate: 0, delayed: [], jitter: 0 }, 1), undefined);
});

test('subscription options: defaults, and one error naming every bad option', () => {
  const resolved = resolveSubscribeOptions('test');
  assert.equal(resolved.concurrency, 8);
  assert.deepEqual(resolved.retry, { immediate: 2, delayed: [1_000, 10_000, 60_000], jitter: 0.1 });
  assert.throws(
    () => resolveSubscribeOptions('subscription x', { concurrency: 0, partitions: 1.5, retry: { delayed: [-1], jitter: 2 }, startFrom: 'yesterday' as never }),
    (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'INVALID_OPTIONS');
      for (const name of ['concurrency', 'partitions', 'retry.delayed', 'retry.jitter', 'startFrom'])
        assert.match(error.message, new RegExp(name.replace('.', '\\.')));
      return true;
    },
  );
});

test('ids are time-ordered UUIDv7; key hashes are stable, 31-bit, and spread over partitions', async () => {
  const a = newId();
  await new Promise((resolve) => setTimeout(resolve, 2));
  const b = newId();
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.ok(a < b);
  // Pinned: a key's partition must not move between versions (messages in flight keep their order).
  assert.deepEqual(['order-1', '', 'ключ-ü-🎉', 'a\u007f\u0080'].map(keyHash), [729795949, 18652613, 953580386, 1450068067]);
  const counts = [0, 0, 0, 0];
  for (let i = 0; i < 4_000; i++) {
    const hash = keyHash(`key-${i}`);
    assert.ok(hash >= 0 && hash < 2 ** 31);
    counts[partitionOf(hash, 4)]!++;
  }
  for (const count of counts) assert.ok(count > 800, `balanced partitions: ${counts.join(', ')}`);
});

/** A backbone that only records what the bus asks it to write: enough to test what the bus sends. */
function recordingBackbone(): Backbone & { written: Outgoing[] } {
  const written: Outgoing[] = [];
  return {
    name: 'recording',
    written,
    open: async () => {},
    publish: async (messages) => {
      written.push(...messages);
    },
    transaction: (fn) => fn(undefined),
    consume: async () => ({ stop: async () => {} }),
    deadLetters: () => {
      throw new Error('the recording backbone keeps no dead letters');
    },
    close: async () => {},
  };
}

test('publish builds a CloudEvents envelope; oversized and invalid payloads are refused before anything is written', async () => {
  const backbone = recordingBackbone();
  const bus = createBus({ service: 'orders', backbone, maxPayloadBytes: 200 });
  const published = await bus.publish(Placed, { orderId: 'o-1', lines: [] }, { tenant: 'acme', subject: 'order/o-1' });
  const [sent] = backbone.written;
  assert.ok(sent);
  assert.deepEqual(
    { ...sent.envelope, time: typeof sent.envelope.time },
    {
      specversion: '1.0',
      id: published.id,
      source: 'tidings://orders',
      type: 'orders.order-placed.v2',
      time: 'string',
      subject: 'order/o-1',
      datacontenttype: 'application/json',
      topic: 'orders.order-placed',
      partitionkey: 'o-1',
      tenant: 'acme',
      correlationid: published.id,
      causationid: undefined,
      traceparent: undefined,
      tracestate: undefined,
      data: { orderId: 'o-1', lines: [] },
    },
  );
  assert.equal(sent.json, '{"orderId":"o-1","lines":[]}');
  const big = await bus.publish(Placed, { orderId: 'o-2', lines: Array.from({ length: 20 }, () => ({ sku: 'sku-123', qty: 1 })) }).catch((e: unknown) => e);
  assert.ok(big instanceof TidingsError && big.code === 'PAYLOAD_TOO_LARGE');
  assert.match(big.message, /over the limit of 200 \(maxPayloadBytes\)/);
  await assert.rejects(bus.publish(Placed, { orderId: 'o-3' } as never), ValidationError);
  await assert.rejects(bus.send(Placed, { orderId: 'o-4', lines: [] }), /is an event: publish it with bus\.publish/);
  assert.equal(backbone.written.length, 1);
  assert.deepEqual(bus.stats().published, { 'orders.order-placed': 1 });
  await bus.stop();
});

test('createBus reports every bad option by name', () => {
  assert.throws(
    () => createBus({ service: '', backbone: undefined as never, maxPayloadBytes: -1 }),
    (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'INVALID_OPTIONS');
      assert.match(error.message, /service "" must be a name/);
      assert.match(error.message, /backbone is required/);
      assert.match(error.message, /maxPayloadBytes/);
      return true;
    },
  );
});

test('the service name must fit the CloudEvents source URI, tidings://<service>', () => {
  const backbone = { publish: async () => undefined } as unknown as Backbone;
  for (const service of ['Billing Service', 'billing/eu', 'a#b', 'x?y', 'ünï', 'x'.repeat(201)]) {
    assert.throws(
      () => createBus({ service, backbone }),
      (error: unknown) => {
        assert.ok(error instanceof TidingsError && error.code === 'INVALID_OPTIONS', service);
        assert.match(error.message, /source URI tidings:\/\/<service>/);
        assert.match(error.message, /billing-service/);
        return true;
      },
    );
  }
  for (const service of ['billing', 'Billing', 'billing-service', 'eu.billing_v2~x']) {
    assert.equal(createBus({ service, backbone }).service, service);
  }
});

test('the attempt loop: a pipeline that throws, or writes that could not be kept, follow the retry policy and end in a dead letter', async () => {
  const { runAttempts } = await import('../src/core/attempts.ts');
  const envelope = {
    specversion: '1.0',
    id: 'm1',
    source: 'tidings://t',
    type: 'x.v1',
    time: new Date().toISOString(),
    datacontenttype: 'application/json',
    topic: 'x',
    partitionkey: 'k',
    correlationid: 'm1',
    data: {},
  } as const;
  const retry = { immediate: 2, delayed: [100], jitter: 0 };
  let calls = 0;
  const throwing = async () => {
    calls++;
    throw new Error('bug below the handler');
  };
  const open = () => ({ tx: undefined, end: async () => undefined });
  const first = await runAttempts(throwing, { first: 1, history: [], retry, envelope: () => envelope, open, stopping: () => false });
  assert.equal(calls, 3, 'the first attempt and two immediate retries');
  assert.equal(first.kind, 'retry');
  assert.equal(first.kind === 'retry' && first.delayMs, 100);
  assert.match(first.kind === 'retry' ? first.history[2]!.error.message : '', /below the handler.*bug below the handler/);
  const last = await runAttempts(throwing, { first: 4, history: [], retry, envelope: () => envelope, open, stopping: () => false });
  assert.equal(last.kind, 'dead', 'the delayed retries spent, a dead letter: never a loop');
  assert.match(last.kind === 'dead' ? last.reason : '', /failed 4 attempts/);

  // The handler acknowledged, but its writes could not be kept.
  const acking = async () => ({ outcome: 'ack' }) as const;
  const losing = () => ({ tx: undefined, end: async (keep: boolean) => (keep ? new Error('unique violation caught by the handler') : undefined) });
  const lost = await runAttempts(acking, {
    first: 1,
    history: [],
    retry: { immediate: 0, delayed: [], jitter: 0 },
    envelope: () => envelope,
    open: losing,
    stopping: () => false,
  });
  assert.equal(lost.kind, 'dead');
  assert.match(lost.kind === 'dead' ? lost.history[0]!.error.message : '', /its writes were rolled back: unique violation/);
});
