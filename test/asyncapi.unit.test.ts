/**
 * AsyncAPI 3.0 documents from code (src/asyncapi): every document the tests make is parsed by the official
 * @asyncapi/parser with no error. In process: the memory backbone, and service records as the registry holds them.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { createBus, defineCommand, defineEvent, type StandardSchemaV1 } from '../src/index.ts';
import { asyncapiDocument } from '../src/asyncapi/document.ts';
import { describeService, type ServiceRecord } from '../src/core/catalog.ts';
import { memory } from '../src/memory/index.ts';
import { parseAsyncApi } from './fixtures/asyncapi.ts';

const OrderPlaced = defineEvent('orders.order-placed', {
  schema: z.object({ orderId: z.string(), amountCents: z.number().int().positive(), currency: z.enum(['EUR', 'USD']), note: z.string().optional() }),
  key: (order) => order.orderId,
  description: 'A customer placed an order',
});
const ChargeCard = defineCommand('payments.charge-card', {
  schema: z.object({ orderId: z.string(), amountCents: z.number().int() }),
  key: (charge) => `${charge.orderId}/charge`,
  reply: z.object({ chargeId: z.string() }),
});
const Audited = defineEvent('audit.audited', { schema: z.object({ what: z.string() }) });

function shopBuses() {
  const backbone = memory({ onWarning: () => undefined });
  const orders = createBus({ service: 'orders', backbone, publishes: [OrderPlaced] });
  const billing = createBus({ service: 'billing', backbone, publishes: [ChargeCard] });
  billing.subscribe('billing.on-order', OrderPlaced, () => undefined, { partitions: 8, retry: { immediate: 1, delayed: [100, 1_000], jitter: 0 } });
  const payments = createBus({ service: 'payments', backbone });
  payments
    .subscription('payments')
    .on(ChargeCard, () => ({ chargeId: 'c1' }))
    .on(Audited, () => undefined);
  return { orders, billing, payments };
}

test("a service's document: channels, send and receive operations, payloads, CloudEvents headers, x-tidings extensions; the parser finds no error", async () => {
  const { billing } = shopBuses();
  const document = await billing.asyncapi();
  assert.equal(document.asyncapi, '3.0.0');
  assert.equal(document.info.title, 'billing');
  assert.deepEqual(Object.keys(document.channels), ['orders.order-placed', 'payments.charge-card', 'payments.charge-card.reply']);
  const placed = document.channels['orders.order-placed']!;
  assert.equal(placed.address, 'orders.order-placed');
  assert.equal(placed.description, 'A customer placed an order');
  const message = placed.messages['orders.order-placed.v1']!;
  assert.deepEqual(message.payload, {
    type: 'object',
    properties: {
      orderId: { type: 'string' },
      amountCents: { type: 'integer', exclusiveMinimum: 0, maximum: 9007199254740991 },
      currency: { type: 'string', enum: ['EUR', 'USD'] },
      note: { type: 'string' },
    },
    required: ['orderId', 'amountCents', 'currency'],
  });
  assert.equal(message['x-tidings-key'], 'orderId');
  assert.equal(message['x-tidings-version'], 1);
  const headers = message.headers as { required: string[]; properties: Record<string, { const?: string }> };
  assert.ok(headers.required.includes('correlationid') && headers.required.includes('partitionkey'));
  assert.equal(headers.properties.type?.const, 'orders.order-placed.v1');
  const send = document.operations['billing.send.payments.charge-card']!;
  assert.equal(send.action, 'send');
  assert.deepEqual(send.reply?.messages, [{ $ref: '#/channels/payments.charge-card.reply/messages/payments.charge-card.v1.reply' }]);
  assert.equal(document.channels['payments.charge-card']!.messages['payments.charge-card.v1']!['x-tidings-key'], 'function');
  const receive = document.operations['billing.billing.on-order.receive.orders.order-placed']!;
  assert.equal(receive.action, 'receive');
  assert.equal(receive['x-tidings-partitions'], 8);
  assert.deepEqual(receive['x-tidings-retry'], { immediate: 1, delayedMs: [100, 1_000], jitter: 0 });
  assert.deepEqual(receive['x-tidings-dead-letters'], { afterAttempts: 4, where: 'memory dead letters' });
  const findings = await parseAsyncApi(document);
  assert.deepEqual(
    findings.filter((finding) => finding.severity === 'warning'),
    [],
  );
});

test('the whole system in one document: every service, the parser finds no error', async () => {
  const buses = shopBuses();
  const records = Object.values(buses).map((bus) => describeService(bus));
  const document = asyncapiDocument(records);
  assert.equal(document.info.title, 'Tidings system');
  assert.deepEqual(Object.keys(document.operations), [
    'billing.billing.on-order.receive.orders.order-placed',
    'billing.send.payments.charge-card',
    'orders.send.orders.order-placed',
    'payments.payments.receive.audit.audited',
    'payments.payments.receive.payments.charge-card',
  ]);
  assert.equal(document.channels['audit.audited']!.messages['audit.audited.v1']!['x-tidings-key'], 'id');
  await parseAsyncApi(document);
});

test('RabbitMQ and NATS services get their bindings: exchange and subject addresses, AMQP and NATS bindings; the parser finds no error', async () => {
  const record = describeService(shopBuses().billing);
  const onRabbit: ServiceRecord = { ...record, backbone: { name: 'rabbitmq', settings: { prefix: 'shop.' } } };
  const rabbit = asyncapiDocument([onRabbit]);
  const channel = rabbit.channels['orders.order-placed']!;
  assert.equal(channel.address, 'shop.orders.order-placed');
  assert.deepEqual((channel.bindings as { amqp: { exchange: unknown } }).amqp.exchange, {
    name: 'shop.orders.order-placed',
    type: 'topic',
    durable: true,
    autoDelete: false,
    vhost: '/',
  });
  assert.deepEqual(rabbit.operations['billing.billing.on-order.receive.orders.order-placed']!['x-tidings-dead-letters'], {
    afterAttempts: 4,
    where: 'queue shop.billing.on-order:dead',
  });
  await parseAsyncApi(rabbit);
  const onNats: ServiceRecord = { ...record, backbone: { name: 'nats', settings: { stream: 'SHOP', subjectPrefix: 'shop' } } };
  const nats = asyncapiDocument([onNats]);
  assert.equal(nats.channels['orders.order-placed']!.address, 'shop.*.orders.order-placed');
  assert.deepEqual(nats.operations['billing.billing.on-order.receive.orders.order-placed']!.bindings, {
    nats: { queue: 'billing.on-order', bindingVersion: '0.1.0' },
  });
  await parseAsyncApi(nats);
});

test('a schema that cannot be converted is named in a warning and documented as {}; a toJSONSchema hook converts it', async () => {
  const opaque: StandardSchemaV1<{ id: string }> = {
    '~standard': { version: 1, vendor: 'hand-made', validate: (value) => ({ value: value as { id: string } }) },
  };
  const Opaque = defineEvent('test.opaque', { schema: opaque });
  const Hooked = defineEvent('test.hooked', {
    schema: opaque,
    toJSONSchema: () => ({ type: 'object', properties: { id: { type: 'string' } }, required: ['id'] }),
  });
  const Dated = defineEvent('test.dated', { schema: z.object({ at: z.date() }) });
  const warnings: string[] = [];
  const bus = createBus({ service: 'opaque', backbone: memory(), publishes: [Opaque, Hooked, Dated] });
  const document = await bus.asyncapi({ onWarning: (message) => warnings.push(message) });
  assert.deepEqual(document.channels['test.opaque']!.messages['test.opaque.v1']!.payload, {});
  assert.deepEqual(document.channels['test.hooked']!.messages['test.hooked.v1']!.payload, {
    type: 'object',
    properties: { id: { type: 'string' } },
    required: ['id'],
  });
  assert.deepEqual(document.channels['test.dated']!.messages['test.dated.v1']!.payload, {});
  assert.equal(warnings.length, 2, warnings.join('\n'));
  assert.match(warnings.join('\n'), /the schema of test\.opaque\.v1 \(hand-made\) cannot be converted to JSON Schema.*toJSONSchema/);
  assert.match(warnings.join('\n'), /the schema of test\.dated\.v1 cannot be converted to JSON Schema \(.*Date.*\)/);
  await parseAsyncApi(document);
});

test('publishes must hold contracts, named by index', () => {
  assert.throws(() => createBus({ service: 'x', backbone: memory(), publishes: [OrderPlaced, { topic: 3 } as never] }), /publishes\[1\] is not a contract/);
});
