/**
 * Option objects with a key Tidings does not know are refused with INVALID_OPTIONS naming the key (and the
 * option it was probably meant to be): a misspelt option is otherwise ignored, its default used in silence.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createBus, defineEvent, TidingsError } from '../src/index.ts';
import { memory } from '../src/memory/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { z } from 'zod';

const Happened = defineEvent('options.happened', { schema: z.object({ n: z.number() }) });

function refused(fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof TidingsError);
    assert.equal(error.code, 'INVALID_OPTIONS');
    assert.match(error.message, message);
    return true;
  });
}

// Options as a JavaScript caller or a config file would pass them: TypeScript would catch a literal.
const loose = (options: object) => options as never;

test('subscribe: a misspelt option and a misspelt retry option are named, with the one meant', () => {
  const bus = createBus({ service: 'options', backbone: memory() });
  refused(
    () => bus.subscribe('billing', Happened, () => undefined, loose({ concurency: 4, retry: { immedate: 1 } })),
    /^Invalid options for subscription billing: concurency is not an option: did you mean concurrency\?; retry\.immedate is not an option: did you mean retry\.immediate\?$/,
  );
  refused(
    () => bus.subscribe('billing', Happened, () => undefined, loose({ parallelism: 4 })),
    /parallelism is not an option \(the options are concurrency, partitions, batchSize, retry, timeoutMs, inbox, startFrom, requireTenant, crossTenant, tenantConcurrency, tenantWeights\)/,
  );
  assert.doesNotThrow(() => bus.subscribe('billing', Happened, () => undefined, { concurrency: 4, retry: { immediate: 1 } }));
});

test('createBus, and its subscriptionDefaults', () => {
  refused(
    () => createBus(loose({ service: 'options', backbone: memory(), maxPayloadByte: 10 })),
    /createBus: maxPayloadByte is not an option: did you mean maxPayloadBytes\?/,
  );
  refused(
    () => createBus(loose({ service: 'options', backbone: memory(), subscriptionDefaults: { timeout: 5 } })),
    /createBus subscriptionDefaults: timeout is not an option/,
  );
});

test('postgres(), its publishBatch and its retention', () => {
  refused(() => postgres(loose({ pglite: true, poolsize: 4 })), /postgres\(\): poolsize is not an option: did you mean poolSize\?/);
  refused(
    () => postgres(loose({ pglite: true, publishBatch: { maxbatch: 10 } })),
    /publishBatch\.maxbatch is not an option: did you mean publishBatch\.maxBatch\?/,
  );
  refused(
    () => postgres(loose({ pglite: true, retention: { log: { maxAge: 1 } } })),
    /retention\.log\.maxAge is not an option: did you mean retention\.log\.maxAgeMs\?/,
  );
  assert.doesNotThrow(() => postgres({ pglite: true, poolSize: 4, publishBatch: { maxBatch: 10 }, retention: { log: { maxAgeMs: 1 } } }));
});

test('rabbitmq(), nats() and their relay options', async () => {
  const { rabbitmq } = await import('../src/rabbitmq/index.ts');
  const { nats } = await import('../src/nats/index.ts');
  refused(() => rabbitmq(loose({ url: 'amqp://localhost', prefetch: 10, heartbeat: 5 })), /rabbitmq\(\): heartbeat is not an option \(the options are/);
  refused(() => rabbitmq(loose({ url: 'amqp://localhost', prefix: 'shop.', quorom: true })), /quorom is not an option: did you mean quorum\?/);
  refused(() => nats(loose({ servers: 'nats://localhost:4222', bucket: 8 })), /nats\(\): bucket is not an option: did you mean buckets\?/);
  refused(
    () => rabbitmq(loose({ url: 'amqp://localhost', outbox: postgres({ pglite: true }), relay: { concurency: 8 } })),
    /rabbitmq\(\): relay\.concurency is not an option: did you mean relay\.concurrency\?/,
  );
  assert.doesNotThrow(() => rabbitmq({ url: 'amqp://localhost', prefix: 'shop.', relay: { concurrency: 8 } }));
  assert.doesNotThrow(() => nats({ servers: 'nats://localhost:4222', buckets: 8, relay: false }));
});

test('memory()', () => {
  refused(() => memory(loose({ maxLogs: 10 })), /memory\(\): maxLogs is not an option: did you mean maxLog\?/);
});
