/**
 * Request/reply on PostgreSQL across processes: answering workers in child processes, one killed with -9
 * while requests are in flight. What every backbone promises is in test/conformance/requests.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pgWorld } from './fixtures/bus.ts';
import { Quote } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { waitFor } from './helpers.ts';

test('1,000 concurrent requests answered by two worker processes, one killed with -9 midway: every request gets its own reply', async (t) => {
  const world = await pgWorld(t, 'req');
  if (world === undefined) return;
  const { schema } = world;
  const client = world.bus('client');
  await client.start();
  const pricers = [await startProcess('pricer', { SCHEMA: schema, HANDLE_MS: '5' }), await startProcess('pricer', { SCHEMA: schema, HANDLE_MS: '5' })];
  const answered = () => pricers.reduce((sum, pricer) => sum + pricer.lines.filter((line) => line.startsWith('answered ')).length, 0);
  try {
    const started = Date.now();
    const requests = Array.from({ length: 1_000 }, (_, n) => client.request(Quote, { key: `k${n % 50}`, n }, { timeoutMs: 60_000 }));
    await waitFor('a fifth answered', () => answered() >= 200, 60_000);
    pricers[0]!.kill();
    const replies = await Promise.all(requests);
    assert.deepEqual(
      replies.map((reply) => reply.price),
      Array.from({ length: 1_000 }, (_, n) => n * 2),
      'every request its own reply',
    );
    t.diagnostic(`1,000 requests in ${Date.now() - started} ms, the kill and the lease's expiry included; ${client.stats().requests.late} late replies`);
  } finally {
    for (const pricer of pricers) pricer.kill();
  }
});
