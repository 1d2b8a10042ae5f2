/**
 * One trace from the publisher's span to the consumer's, on each backbone, with the OpenTelemetry SDK's
 * in-memory span exporter: on PostgreSQL (publish in a transaction, then the subscription's process span);
 * on RabbitMQ and NATS through the outbox (the publish writes to the PostgreSQL outbox in the caller's
 * transaction, the relay span hands it to the broker, the consumer's process span is the relay span's child).
 * Beside it, each reader's receive span (the relay's read of the outbox, the subscription's read of the
 * broker): a root span linked to the message's creation context, as the process span is.
 */
import assert from 'node:assert/strict';
import { after, test, type TestContext } from 'node:test';
import { SpanKind } from '@opentelemetry/api';
import type { ReadableSpan } from '@opentelemetry/sdk-trace';
import { createBus, type Backbone, type Bus } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { quickPostgres } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { natsNamespace, quickNats } from './fixtures/nats.ts';
import { otelWorld } from './fixtures/otel.ts';
import { deleteByPrefix } from './fixtures/rabbitmq.ts';
import { DATABASE_URL, dropSchema, RABBITMQ_URL, requireBroker, requirePostgres, uniqueSchema, waitFor } from './helpers.ts';

const buses: Bus<PgTransaction>[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

/** The schema of a test's PostgreSQL backbone or outbox; undefined when PostgreSQL is unreachable. */
async function schemaFor(t: TestContext): Promise<string | undefined> {
  if (!(await requirePostgres(t))) return undefined;
  const schema = uniqueSchema('tr');
  cleanups.push(() => dropSchema(schema));
  return schema;
}

/** Publishes one message in a transaction and waits for the consumer's process and receive spans. */
async function traceOne(backbone: () => Backbone<PgTransaction>): Promise<{ spans: ReadableSpan[]; id: string }> {
  const otel = otelWorld();
  const telemetry = { tracerProvider: otel.tracerProvider, meterProvider: otel.meterProvider };
  const consumer = createBus({ service: 'consumer', backbone: backbone(), telemetry });
  buses.push(consumer);
  const got: string[] = [];
  consumer.subscribe('traced', Ticked, (message) => {
    got.push(message.id);
  });
  await consumer.start();
  const publisher = createBus({ service: 'publisher', backbone: backbone(), telemetry });
  buses.push(publisher);
  await publisher.start();
  const sent = await publisher.transaction((tx) => publisher.publish(Ticked, { key: 'k', seq: 1 }, { tx }));
  await waitFor(
    'the consumer span and its read',
    () => otel.spans().some((span) => span.name === 'process test.ticked') && otel.spans().some((span) => span.name === 'receive traced'),
    30_000,
  );
  return { spans: otel.spans(), id: sent.id };
}

function byName(spans: readonly ReadableSpan[]): Map<string, ReadableSpan> {
  return new Map(spans.map((span) => [span.name, span]));
}

/**
 * The read of `subscription` that took message `id`: a root CONSUMER span linked to the context `producer`
 * wrote into the message, with the id on the link, as the process span of the message links to it too.
 */
function assertReceived(spans: readonly ReadableSpan[], subscription: string, system: string, producer: ReadableSpan, id: string): void {
  const creation = producer.spanContext().spanId;
  const receive = spans.find((span) => span.name === `receive ${subscription}` && span.links.some((link) => link.context.spanId === creation));
  assert.ok(receive, `a receive span of ${subscription} linked to ${producer.name} among ${spans.map((span) => span.name).join(', ')}`);
  assert.equal(receive.kind, SpanKind.CONSUMER);
  assert.equal(receive.parentSpanContext, undefined, 'a root span: a read serves many traces');
  assert.equal(receive.attributes['messaging.system'], system);
  assert.equal(receive.attributes['messaging.operation.type'], 'receive');
  assert.equal(receive.attributes['messaging.consumer.group.name'], subscription);
  assert.ok(Number(receive.attributes['messaging.batch.message_count']) >= 1);
  const link = receive.links.find((candidate) => candidate.context.spanId === creation)!;
  assert.equal(link.attributes?.['messaging.message.id'], id);
}

function assertChain(spans: Map<string, ReadableSpan>, chain: readonly string[]): void {
  const found = chain.map((name) => {
    const span = spans.get(name);
    assert.ok(span, `span ${name} among ${[...spans.keys()].join(', ')}`);
    return span;
  });
  const traceId = found[0]!.spanContext().traceId;
  for (let i = 1; i < found.length; i++) {
    assert.equal(found[i]!.spanContext().traceId, traceId, `${chain[i]} is in the publisher's trace`);
    assert.equal(found[i]!.parentSpanContext?.spanId, found[i - 1]!.spanContext().spanId, `${chain[i]} is the child of ${chain[i - 1]}`);
  }
}

test('PostgreSQL: send (producer) -> process (consumer), one trace', async (t) => {
  const schema = await schemaFor(t);
  if (schema === undefined) return;
  const { spans: all, id } = await traceOne(() => postgres({ url: DATABASE_URL, schema, ...quickPostgres }));
  const spans = byName(all);
  assertChain(spans, ['send test.ticked', 'process test.ticked']);
  const process = spans.get('process test.ticked')!;
  assert.equal(process.kind, SpanKind.CONSUMER);
  assert.equal(process.attributes['messaging.system'], 'postgres');
  assert.equal(process.attributes['messaging.consumer.group.name'], 'traced');
  assertReceived(all, 'traced', 'postgres', spans.get('send test.ticked')!, id);
});

test('RabbitMQ with an outbox: send -> relay (outbox to broker) -> process, one trace', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return;
  const schema = await schemaFor(t);
  if (schema === undefined) return;
  const prefix = `trace_${process.pid}_${Math.random().toString(36).slice(2, 8)}.`;
  cleanups.push(() => deleteByPrefix(prefix));
  const { spans: all, id } = await traceOne(() =>
    rabbitmq({
      url: RABBITMQ_URL,
      prefix,
      reconnectMinMs: 50,
      reconnectMaxMs: 500,
      onWarning: () => undefined,
      outbox: postgres({ url: DATABASE_URL, schema, ...quickPostgres }),
    }),
  );
  const spans = byName(all);
  assertChain(spans, ['send test.ticked', 'relay test.ticked', 'process test.ticked']);
  const relay = spans.get('relay test.ticked')!;
  assert.equal(relay.kind, SpanKind.PRODUCER);
  assert.equal(relay.attributes['messaging.system'], 'rabbitmq');
  assert.equal(relay.attributes['messaging.operation.name'], 'relay');
  assert.equal(spans.get('process test.ticked')!.attributes['messaging.system'], 'rabbitmq');
  assertReceived(all, 'tidings-relay', 'postgres', spans.get('send test.ticked')!, id);
  assertReceived(all, 'traced', 'rabbitmq', relay, id);
});

test('NATS JetStream with an outbox: send -> relay (outbox to broker) -> process, one trace', async (t) => {
  const namespace = await natsNamespace(t, 'trace');
  if (namespace === undefined) return;
  cleanups.push(() => namespace.cleanup());
  const schema = await schemaFor(t);
  if (schema === undefined) return;
  const { spans: all, id } = await traceOne(() =>
    nats({ ...namespace.options(), ...quickNats, outbox: postgres({ url: DATABASE_URL, schema, ...quickPostgres }) }),
  );
  const spans = byName(all);
  assertChain(spans, ['send test.ticked', 'relay test.ticked', 'process test.ticked']);
  assert.equal(spans.get('relay test.ticked')!.attributes['messaging.system'], 'nats');
  assertReceived(all, 'tidings-relay', 'postgres', spans.get('send test.ticked')!, id);
  assertReceived(all, 'traced', 'nats', spans.get('relay test.ticked')!, id);
  assert.notEqual(all.find((span) => span.name === 'receive traced')!.attributes['messaging.destination.partition.id'], undefined, 'a pull reads one bucket');
});
