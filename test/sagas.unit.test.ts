/**
 * A saga's own contract, its timeout (src/core/saga.ts timeoutContract), in the service's description: its
 * schema is documented, so a service with a saga starts without a warning about it (the registry and AsyncAPI
 * read every contract a subscription handles). The saga's behaviour is in test/conformance/sagas.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createBus } from '../src/index.ts';
import { memory } from '../src/memory/index.ts';
import { Counter } from './fixtures/counter-saga.ts';

test("a saga's timeout contract is documented with its JSON Schema: no warning, the instance and the timeout's name required", async () => {
  const bus = createBus({ service: 'counting', backbone: memory() });
  bus.saga(Counter);
  const warnings: string[] = [];
  const document = await bus.asyncapi({ onWarning: (message) => warnings.push(message) });
  assert.deepEqual(warnings, []);
  const channel = document.channels['tidings.saga.test.counter.timeout'];
  assert.ok(channel !== undefined, `the timeout's channel is documented (channels: ${Object.keys(document.channels).join(', ')})`);
  const payload = channel.messages['tidings.saga.test.counter.timeout.v1']?.payload as { required?: string[] } | undefined;
  assert.deepEqual(payload?.required, ['id', 'name']);
});
