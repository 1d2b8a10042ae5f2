/**
 * Traces, metrics, logs and events on the memory backbone, with the real OpenTelemetry SDK (in-memory span
 * exporter, a metric reader) and real pino: the shapes every backbone shares, since they are recorded at the
 * core's seams (publish, and the delivery handler every backbone calls per attempt).
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { Writable } from 'node:stream';
import { test } from 'node:test';
import { SpanKind, trace } from '@opentelemetry/api';
import pino from 'pino';
import { createBus, defineEvent, deadLetter, type BusOptions } from '../src/index.ts';
import { memory, type MemoryTransaction } from '../src/memory/index.ts';
import { z } from 'zod';
import { Ticked, Tocked } from './fixtures/contracts.ts';
import { otelWorld, total } from './fixtures/otel.ts';
import { waitFor } from './helpers.ts';

function busWith(t: { after(fn: () => Promise<void>): void }, options: Partial<BusOptions<MemoryTransaction>> = {}) {
  const bus = createBus({ service: 'obs', backbone: memory({ onWarning: () => undefined }), ...options });
  t.after(() => bus.stop());
  return bus;
}

test('one trace: send (producer) -> process (consumer) -> send of what the handler publishes -> its process', async (t) => {
  const otel = otelWorld();
  const bus = busWith(t, { telemetry: { tracerProvider: otel.tracerProvider, meterProvider: otel.meterProvider } });
  const seen: string[] = [];
  bus.subscribe('relayer', Ticked, async (message, ctx) => {
    await ctx.publish(Tocked, { key: message.data.key, seq: message.data.seq });
  });
  bus.subscribe('sink', Tocked, (message) => {
    seen.push(message.traceparent ?? '');
  });
  await bus.start();
  const sent = await bus.publish(Ticked, { key: 'k', seq: 1 });
  await waitFor('both handlers and their spans', () => seen.length === 1 && otel.spans().some((span) => span.name === 'process test.tocked'));
  const spans = otel.spans();
  const send = spans.find((span) => span.name === 'send test.ticked')!;
  const process = spans.find((span) => span.name === 'process test.ticked')!;
  const forward = spans.find((span) => span.name === 'send test.tocked')!;
  const sink = spans.find((span) => span.name === 'process test.tocked')!;
  for (const span of [send, process, forward, sink]) {
    assert.ok(span, `missing span among ${spans.map((s) => s.name).join(', ')}`);
    assert.equal(span.spanContext().traceId, send.spanContext().traceId, `${span.name} is in the publisher's trace`);
  }
  assert.equal(send.kind, SpanKind.PRODUCER);
  assert.equal(process.kind, SpanKind.CONSUMER);
  assert.equal(process.parentSpanContext?.spanId, send.spanContext().spanId);
  assert.equal(forward.parentSpanContext?.spanId, process.spanContext().spanId);
  assert.equal(sink.parentSpanContext?.spanId, forward.spanContext().spanId);
  assert.deepEqual(
    process.links.map((link) => link.context.spanId),
    [send.spanContext().spanId],
  );
  assert.equal(seen[0], `00-${forward.spanContext().traceId}-${forward.spanContext().spanId}-01`, 'the envelope carries the producer span');
  assert.deepEqual(
    { ...send.attributes },
    {
      'messaging.system': 'memory',
      'messaging.operation.type': 'send',
      'messaging.operation.name': 'send',
      'messaging.destination.name': 'test.ticked',
      'messaging.message.id': sent.id,
    },
  );
  assert.equal(process.attributes['messaging.consumer.group.name'], 'relayer');
  assert.equal(process.attributes['messaging.operation.type'], 'process');
  assert.equal(process.attributes['messaging.message.id'], sent.id);
  assert.equal(process.attributes['tidings.attempt'], 1);
  assert.equal(process.attributes['tidings.outcome'], 'ack');
});

test('a publishMany is one send span with the batch count; a given traceparent is its parent', async (t) => {
  const otel = otelWorld();
  const bus = busWith(t, { telemetry: { tracerProvider: otel.tracerProvider, metrics: false } });
  await bus.start();
  const parent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
  await bus.publishMany(
    Ticked,
    [1, 2, 3].map((seq) => ({ key: 'k', seq })),
    { traceparent: parent },
  );
  const [send] = otel.spans();
  assert.equal(send?.attributes['messaging.batch.message_count'], 3);
  assert.equal(send?.spanContext().traceId, '0af7651916cd43dd8448eb211c80319c');
  assert.equal(send?.parentSpanContext?.spanId, 'b7ad6b7169203331');
});

test("receive spans: a worker's read is one root span per batch, linked to each message's creation context like its process span", async (t) => {
  const otel = otelWorld();
  const bus = busWith(t, { telemetry: { tracerProvider: otel.tracerProvider, metrics: false } });
  let handled = 0;
  bus.subscribe(
    'reader',
    Ticked,
    () => {
      handled++;
    },
    { concurrency: 8 },
  );
  await bus.start();
  const sent = await bus.transaction(async (tx) => [
    await bus.publish(Ticked, { key: 'a', seq: 1 }, { tx }),
    await bus.publish(Ticked, { key: 'b', seq: 1 }, { tx }),
    await bus.publish(Ticked, { key: 'c', seq: 1 }, { tx }),
  ]);
  await waitFor('three handled', () => handled === 3);
  const spans = otel.spans();
  const receives = spans.filter((span) => span.name === 'receive reader');
  assert.ok(receives.length >= 1);
  assert.equal(
    receives.reduce((sum, span) => sum + Number(span.attributes['messaging.batch.message_count']), 0),
    3,
    'every message read once',
  );
  // Committed together, ready together: one read takes the three keys' heads.
  const [receive] = receives;
  assert.equal(receives.length, 1);
  assert.equal(receive!.kind, SpanKind.CONSUMER);
  assert.equal(receive!.parentSpanContext, undefined);
  assert.deepEqual(
    { ...receive!.attributes },
    {
      'messaging.system': 'memory',
      'messaging.operation.type': 'receive',
      'messaging.operation.name': 'receive',
      'messaging.consumer.group.name': 'reader',
      'messaging.destination.subscription.name': 'reader',
      'messaging.destination.name': 'test.ticked',
      'messaging.batch.message_count': 3,
    },
  );
  for (const message of sent) {
    const send = spans.find((span) => span.name === 'send test.ticked' && span.attributes['messaging.message.id'] === message.id)!;
    const process = spans.find((span) => span.name === 'process test.ticked' && span.attributes['messaging.message.id'] === message.id)!;
    const link = receive!.links.find((candidate) => candidate.context.spanId === send.spanContext().spanId);
    assert.equal(link?.attributes?.['messaging.message.id'], message.id, 'the read links to the creation context, the id on the link');
    assert.deepEqual(
      process.links.map((candidate) => candidate.context.spanId),
      [send.spanContext().spanId],
      'so does the process span',
    );
  }
});

const Strict = defineEvent('test.strict', { schema: z.object({ n: z.number().int() }) });

test('metrics: published, handled, failed, retried, dead-lettered by topic and subscription; durations and latency', async (t) => {
  const otel = otelWorld();
  const bus = busWith(t, {
    telemetry: { tracerProvider: otel.tracerProvider, meterProvider: otel.meterProvider },
    subscriptionDefaults: { retry: { immediate: 1, delayed: [], jitter: 0 } },
  });
  let failures = 0;
  bus.subscribe('counting', Ticked, (message) => {
    if (message.data.seq === 2 && failures++ < 1) throw new Error('once');
    if (message.data.seq === 3) return deadLetter('no');
  });
  await bus.start();
  await bus.publishMany(
    Ticked,
    [1, 2, 3].map((seq) => ({ key: `k${seq}`, seq })),
  );
  let metrics = await otel.metrics();
  await waitFor('two handled and one dead letter', async () => {
    metrics = await otel.metrics();
    return total(metrics.get('tidings.messages.handled')) === 2 && total(metrics.get('tidings.messages.dead_lettered')) === 1;
  });
  const where = { 'messaging.destination.name': 'test.ticked', 'messaging.consumer.group.name': 'counting' };
  assert.equal(total(metrics.get('messaging.client.sent.messages'), { 'messaging.destination.name': 'test.ticked' }), 3);
  assert.equal(total(metrics.get('tidings.messages.handled'), where), 2);
  assert.equal(total(metrics.get('tidings.messages.retried'), where), 1);
  assert.equal(total(metrics.get('tidings.messages.failed'), where), 2);
  assert.equal(total(metrics.get('tidings.messages.dead_lettered'), where), 1);
  const duration = metrics.get('messaging.process.duration')!;
  const count = duration.dataPoints.reduce((sum, point) => sum + (point.value as { count: number }).count, 0);
  assert.equal(count, 4, 'every attempt is timed');
  const latency = metrics.get('tidings.message.latency')!;
  assert.equal(
    latency.dataPoints.reduce((sum, point) => sum + (point.value as { count: number }).count, 0),
    2,
    'publish-to-handled latency per handled message',
  );
});

test('logger: pino gets a structured line per retry and dead letter; events fire, and a throwing listener breaks nothing', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) if (line !== '') lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  const logger = pino({ level: 'debug' }, sink);
  const bus = busWith(t, { logger, telemetry: false, subscriptionDefaults: { retry: { immediate: 1, delayed: [], jitter: 0 } } });
  const events: string[] = [];
  bus.on('message:retry', (event) => {
    events.push(`retry ${event.attempt}`);
    throw new Error('a buggy listener');
  });
  bus.on('message:dead-letter', async (event) => {
    events.push(`dead ${event.attempt}`);
    throw new Error('a buggy async listener');
  });
  bus.on('message:invalid', (event) => {
    events.push(`invalid ${event.topic}`);
  });
  let handled = 0;
  bus.subscribe('failing', Ticked, () => {
    handled++;
    throw new Error('boom');
  });
  bus.subscribe('strict', Strict, () => undefined);
  await bus.start();
  const sent = await bus.publish(Ticked, { key: 'k', seq: 1 });
  await bus.backbone.publish([
    {
      envelope: {
        specversion: '1.0',
        id: 'bad-1',
        source: 'tidings://other',
        type: 'test.strict.v1',
        time: new Date().toISOString(),
        datacontenttype: 'application/json',
        topic: 'test.strict',
        partitionkey: 'bad-1',
        correlationid: 'bad-1',
        data: { n: 'not a number' },
      },
      json: '{"n":"not a number"}',
      keyHash: 1,
    },
  ]);
  await waitFor('the dead letters', () => events.includes('dead 2') && events.includes('invalid test.strict'));
  assert.equal(handled, 2);
  assert.deepEqual(events.filter((event) => !event.startsWith('invalid')).sort(), ['dead 1', 'dead 2', 'retry 1']);
  const retry = lines.find((line) => line.msg?.toString().includes('retrying'))!;
  assert.equal(retry.level, 40, 'a retry is a warning');
  assert.equal(retry.messageId, sent.id);
  assert.equal(retry.topic, 'test.ticked');
  assert.equal(retry.subscription, 'failing');
  assert.equal(retry.attempt, 1);
  assert.equal((retry.err as { message: string }).message, 'boom');
  const dead = lines.find((line) => line.messageId === sent.id && line.level === 50)!;
  assert.equal(dead.attempt, 2);
  const invalid = lines.find((line) => line.messageId === 'bad-1')!;
  assert.match(String(invalid.msg), /invalid message bad-1 sent to dead letters/);
  assert.ok(
    lines.some((line) => String(line.msg).includes('A listener of message:retry threw')),
    'the throwing listener is reported through the logger, as a warning of the bus',
  );
});

test('without @opentelemetry/api wanted (telemetry: false) nothing is recorded and messages flow as before', async (t) => {
  const otel = otelWorld();
  const bus = busWith(t, { telemetry: false });
  const got: (string | undefined)[] = [];
  bus.subscribe('plain', Ticked, (message) => {
    got.push(message.traceparent);
  });
  await bus.start();
  const parent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
  await bus.publish(Ticked, { key: 'k', seq: 1 }, { traceparent: parent });
  await waitFor('the message', () => got.length === 1);
  assert.equal(got[0], parent, 'the traceparent travels as given');
  assert.equal(otel.spans().length, 0);
});

test('with the API and no SDK registered nothing is built for spans; an SDK registered later records from the next message on', async (t) => {
  const bus = busWith(t, { telemetry: { metrics: false } }); // the API's global tracer provider
  const got: (string | undefined)[] = [];
  bus.subscribe('late', Ticked, (message) => {
    got.push(message.traceparent);
  });
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 1 });
  await waitFor('the first message', () => got.length === 1);
  assert.equal(got[0], undefined, 'no span, so no context to carry');
  const otel = otelWorld();
  trace.setGlobalTracerProvider(otel.tracerProvider);
  t.after(() => trace.disable());
  await bus.publish(Ticked, { key: 'k', seq: 2 });
  await waitFor('the second message and its spans', () => got.length === 2 && otel.spans().some((span) => span.name === 'process test.ticked'));
  const send = otel.spans().find((span) => span.name === 'send test.ticked')!;
  assert.equal(got[1], `00-${send.spanContext().traceId}-${send.spanContext().spanId}-01`);
  assert.ok(otel.spans().some((span) => span.name === 'receive late'));
});

test('telemetry and logger options are checked by name', () => {
  assert.throws(
    () => createBus({ service: 's', backbone: memory(), telemetry: { tracer: {} } as never, logger: { info: () => undefined } as never }),
    (error: Error) =>
      error.message.includes('telemetry.tracer') &&
      error.message.includes('logger must be pino-style, with error, warn, info methods taking (record, message); it lacks error, warn'),
  );
  assert.throws(() => createBus({ service: 's', backbone: memory(), telemetry: { tracerProvider: {} } as never }), /telemetry\.tracerProvider must be/);
});

test('without @opentelemetry/api installed: the bus runs as before, silently, and the traceparent travels as given', async () => {
  const child = spawnSync(
    process.execPath,
    ['--import', 'tsx', '--import', './test/fixtures/hide-otel.ts', '--conditions=tidings-source', 'test/fixtures/bus-without-otel.ts'],
    {
      encoding: 'utf8',
      timeout: 60_000,
    },
  );
  assert.equal(child.status, 0, child.stderr);
  const result = JSON.parse(child.stdout.trim().split('\n').at(-1)!) as { seen: string[]; warnings: string[]; api: string };
  assert.equal(result.api, 'ERR_MODULE_NOT_FOUND', 'the package is out of reach');
  assert.deepEqual(result.seen, ['00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01']);
  assert.deepEqual(result.warnings, []);
});
