/**
 * Contract evolution on every backbone: a consumer on version 2 of a contract receives version 1 messages
 * upcast (typed as version 2), in key order with version 2 ones; a version 1 message its upcaster cannot
 * read, and a version 3 message, go to dead letters with the reason, and the consumer keeps going. Part of
 * the conformance suite (suite.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { defineEvent } from '../../src/index.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';

/** Version 1: the price as a number of cents. */
const PricedV1 = defineEvent('test.priced', {
  schema: z.object({ key: z.string(), seq: z.number().int(), cents: z.number().int() }),
  key: (data) => data.key,
});

/** Version 2: the price as an amount and a currency; version 1 messages are read through the upcaster. */
const PricedV2 = defineEvent('test.priced', {
  version: 2,
  schema: z.object({ key: z.string(), seq: z.number().int(), price: z.object({ amount: z.string(), currency: z.string().length(3) }) }),
  key: (data) => data.key,
  upcast: {
    1: (v1: { key: string; seq: number; cents: number }) => {
      if (v1.cents < 0) throw new Error(`a negative price (${v1.cents} cents) has no version 2`);
      return { key: v1.key, seq: v1.seq, price: { amount: (v1.cents / 100).toFixed(2), currency: 'EUR' } };
    },
  },
});

/** Version 3, published by a producer deployed before its consumers: no consumer reads it yet. */
const PricedV3 = defineEvent('test.priced', {
  version: 3,
  schema: z.object({ key: z.string(), seq: z.number().int(), amount: z.string() }),
  key: (data) => data.key,
});

export function upcasting<Tx>(kit: SuiteKit<Tx>): void {
  test('upcasting: a v2 consumer gets v1 messages upcast and typed as v2; a v1 its upcaster refuses and a v3 go to dead letters with the reason', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const consumer = kit.newBus(namespace);
    const seen: Array<{ seq: number; amount: string; currency: string; type: string }> = [];
    consumer.subscribe(
      'priced',
      PricedV2,
      (message) => {
        // Typed as version 2: the upcaster's work is invisible to the handler.
        seen.push({ seq: message.data.seq, amount: message.data.price.amount, currency: message.data.price.currency, type: message.type });
      },
      { partitions: 1, retry: { immediate: 0, delayed: [], jitter: 0 } },
    );
    await consumer.start();
    const old = kit.newBus(namespace);
    const newer = kit.newBus(namespace);
    await old.publish(PricedV1, { key: 'p', seq: 1, cents: 1250 });
    await newer.publish(PricedV2, { key: 'p', seq: 2, price: { amount: '3.00', currency: 'USD' } });
    await old.publish(PricedV1, { key: 'p', seq: 3, cents: -5 });
    await newer.publish(PricedV3, { key: 'p', seq: 4, amount: '4.00' });
    await old.publish(PricedV1, { key: 'p', seq: 5, cents: 99 });
    await waitFor('the three readable messages', () => seen.length >= 3, 20_000);
    const store = consumer.backbone.deadLetters();
    await waitFor('the two unreadable ones in dead letters', async () => (await store.count({ subscription: 'priced' })) === 2, 20_000);
    await sleep(200);
    assert.deepEqual(seen, [
      { seq: 1, amount: '12.50', currency: 'EUR', type: 'test.priced.v1' },
      { seq: 2, amount: '3.00', currency: 'USD', type: 'test.priced.v2' },
      { seq: 5, amount: '0.99', currency: 'EUR', type: 'test.priced.v1' },
    ]);
    const reasons = (await store.list({ subscription: 'priced' })).deadLetters.map((letter) => letter.reason).sort();
    assert.match(
      reasons.join('\n'),
      /Upcasting version 1 of test\.priced to version 2 failed: a negative price \(-5 cents\) has no version 2; fix the upcaster, then redrive/,
    );
    assert.match(reasons.join('\n'), /no handler for version 3 of test\.priced \(it reads version 2\)/);
  });
}
