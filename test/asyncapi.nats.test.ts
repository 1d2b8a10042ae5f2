/**
 * The contracts registry of a NATS bus without an outbox database (src/nats/registry.ts): services record
 * themselves in the stream's KV bucket when they start, and `tidings asyncapi --url nats://... --stream`
 * documents the system from it, with NATS subjects and bindings; @asyncapi/parser finds no error.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { createBus, defineEvent } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { parseAsyncApi } from './fixtures/asyncapi.ts';
import { natsNamespace } from './fixtures/nats.ts';
import { NATS_URL, runTidings } from './helpers.ts';

const Placed = defineEvent('orders.order-placed', {
  schema: z.object({ orderId: z.string() }),
  key: (order) => order.orderId,
  description: 'A customer placed an order',
});

test('a NATS bus records itself in the KV registry; tidings asyncapi --url nats:// documents it with subjects and bindings', async (t) => {
  const namespace = await natsNamespace(t, 'asyncapi');
  if (namespace === undefined) return;
  const orders = createBus({ service: 'orders', backbone: nats(namespace.options()), publishes: [Placed] });
  const billing = createBus({ service: 'billing', backbone: nats(namespace.options()) });
  billing.subscribe('billing.on-order', Placed, () => undefined);
  // The buses stop before their stream is deleted.
  t.after(async () => {
    await Promise.all([orders.stop(), billing.stop()]);
    await namespace.cleanup();
  });
  await orders.start();
  await billing.start();
  const services = await orders.backbone.contracts!()!.services();
  assert.deepEqual(
    services.map((service) => service.service),
    ['billing', 'orders'],
  );
  const run = await runTidings(['asyncapi', '--url', NATS_URL, '--stream', namespace.stream]);
  assert.equal(run.code, 0, run.stderr);
  const document = JSON.parse(run.stdout);
  assert.equal(document.channels['orders.order-placed'].address, `${namespace.subjectPrefix}.*.orders.order-placed`);
  assert.deepEqual(document.operations['billing.billing.on-order.receive.orders.order-placed'].bindings, {
    nats: { queue: 'billing.on-order', bindingVersion: '0.1.0' },
  });
  assert.equal(document.operations['billing.billing.on-order.receive.orders.order-placed']['x-tidings-dead-letters'].where, `stream ${namespace.stream}_DLQ`);
  await parseAsyncApi(document);
});
