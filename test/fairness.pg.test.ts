/**
 * Fair delivery between tenants within a subscription (src/postgres/consume/fair.ts): a noisy tenant whose
 * backlog fills a batch does not hold up the quiet tenants' messages read with it, each key keeps its
 * order, and weights give a tenant a larger share. Measured in messages handled, not milliseconds, so a
 * busy machine does not change the verdict.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { SubscribeOptions } from '../src/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { sleep, waitFor } from './helpers.ts';

const quiet = ['q1', 'q2', 'q3', 'q4', 'q5', 'q6'];

/** A noisy tenant's backlog (8 keys x 10 messages) committed ahead of one message per quiet tenant; what had been handled when the quiet ones were. */
async function run(
  t: Parameters<typeof pgWorld>[0],
  options: SubscribeOptions,
): Promise<{ noisyBeforeQuiet: number; order: Map<string, number[]>; peakNoisy: number } | undefined> {
  const world = await pgWorld(t, 'fair');
  if (world === undefined) return undefined;
  const bus = world.bus();
  const order = new Map<string, number[]>();
  let noisyHandled = 0;
  let quietHandled = 0;
  let noisyBeforeQuiet = 0;
  let noisyRunning = 0;
  let peakNoisy = 0;
  bus.subscribe(
    'fair',
    Ticked,
    async (message) => {
      const noisy = message.tenant === 'noisy';
      if (noisy) peakNoisy = Math.max(peakNoisy, ++noisyRunning);
      await sleep(noisy ? 15 : 1);
      if (noisy) {
        noisyRunning--;
        noisyHandled++;
      } else if (++quietHandled === quiet.length) noisyBeforeQuiet = noisyHandled;
      order.set(message.key, [...(order.get(message.key) ?? []), message.data.seq]);
    },
    { partitions: 1, batchSize: 500, concurrency: 4, startFrom: 'beginning', inbox: false, ...options },
  );
  for (let seq = 1; seq <= 10; seq++) {
    await bus.publishMany(
      Ticked,
      Array.from({ length: 8 }, (_, key) => ({ key: `noisy-${key}`, seq })),
      { tenant: 'noisy' },
    );
  }
  for (const tenant of quiet) await bus.publish(Ticked, { key: tenant, seq: 1 }, { tenant });
  await bus.start();
  await waitFor('every message', () => noisyHandled === 80 && quietHandled === quiet.length);
  return { noisyBeforeQuiet, order, peakNoisy };
}

test("fair delivery: a noisy tenant's backlog in the batch does not hold up the quiet tenants; without it, it does", async (t) => {
  const fair = await run(t, { tenantConcurrency: 1 });
  if (fair === undefined) return;
  const unfair = await run(t, {});
  assert.ok(unfair !== undefined);
  // Fair: the noisy tenant has one slot, the quiet ones the other three: they are done after a few noisy messages.
  assert.ok(fair.noisyBeforeQuiet <= 4, `fair: ${fair.noisyBeforeQuiet} noisy messages were handled before the last quiet one`);
  assert.equal(fair.peakNoisy, 1, 'fair: one noisy key in flight at a time');
  // Unfair: the noisy keys, read first, take every slot until most of the backlog is done.
  assert.ok(unfair.noisyBeforeQuiet >= 60, `unfair: only ${unfair.noisyBeforeQuiet} noisy messages before the last quiet one`);
  for (const { order } of [fair, unfair]) {
    for (const [key, seqs] of order) {
      if (key.startsWith('noisy')) assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], `${key} in order`);
    }
  }
});

test('fair delivery: a weight gives a tenant a larger share of the slots', async (t) => {
  const weighted = await run(t, { tenantConcurrency: 1, tenantWeights: { noisy: 3 } });
  if (weighted === undefined) return;
  assert.equal(weighted.peakNoisy, 3, 'three noisy keys in flight at once');
});
