/**
 * Request/reply on every backbone that can carry replies (PostgreSQL, memory, brokers with an outbox):
 * replies matched to their requests, typed and validated; timeouts, late replies counted; a request that
 * fails for good answers with its error; not from inside a handler. Part of the conformance suite.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PermanentError, TidingsError, ValidationError } from '../../src/index.ts';
import { Quote, Ticked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';
import type { ConformanceTarget } from './suite.ts';

export function requestReply<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test('request/reply: 100 concurrent requests each get their own reply; timeouts, late replies, failures and bad replies are reported', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const pricing = kit.newBus(namespace);
    pricing.subscribe(
      'pricing',
      Quote,
      async (message) => {
        const { n } = message.data;
        if (n === -1) throw new PermanentError('no price for that');
        if (n === -2) return { price: 'free' } as never;
        if (n === -3) await sleep(1_200);
        return { price: n * 2 };
      },
      { concurrency: 16 },
    );
    const inside: unknown[] = [];
    pricing.subscribe('asks-inside', Ticked, async () => {
      inside.push(await pricing.request(Quote, { key: 'in', n: 1 }).catch((error: unknown) => error));
    });
    await pricing.start();
    const client = kit.newBus(namespace);
    await client.start();
    if (!target.offers.transactions) {
      await assert.rejects(client.request(Quote, { key: 'k', n: 1 }), (error: unknown) => error instanceof TidingsError && /outbox/.test(error.message));
      return;
    }
    const replies = await Promise.all(Array.from({ length: 100 }, (_, n) => client.request(Quote, { key: `k${n % 7}`, n }, { timeoutMs: 20_000 })));
    const typed: { price: number }[] = replies;
    assert.deepEqual(
      typed.map((reply) => reply.price),
      Array.from({ length: 100 }, (_, n) => n * 2),
      'each reply matched to its request',
    );

    await assert.rejects(client.request(Quote, { key: 'slow', n: -3 }, { timeoutMs: 300 }), (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'REQUEST_TIMEOUT', String(error));
      assert.match(error.message, /Request test\.quote \(message \S+\) got no reply within 300 ms/);
      return true;
    });
    await waitFor('the late reply counted', () => client.stats().requests.late === 1, 20_000);
    await assert.rejects(client.request(Quote, { key: 'f', n: -1 }, { timeoutMs: 20_000 }), (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'REQUEST_FAILED', String(error));
      assert.match(error.message, /no price for that/);
      return true;
    });
    await assert.rejects(client.request(Quote, { key: 'b', n: -2 }, { timeoutMs: 20_000 }), (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'INVALID_PAYLOAD', String(error));
      assert.match(error.message, /reply of test\.quote.*price/);
      return true;
    });
    await assert.rejects(client.request(Quote, { key: 'v', n: 'one' } as never), ValidationError);
    await client.publish(Ticked, { key: 'x', seq: 1 });
    await waitFor('the handler that asked', () => inside.length === 1, 20_000);
    assert.ok(inside[0] instanceof TidingsError && /inside a handler would hold the handler's key/.test(inside[0].message));
    const stats = client.stats().requests;
    assert.equal(stats.answered, 100);
    assert.equal(stats.timedOut, 1);
  });
}
