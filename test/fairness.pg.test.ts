/**
 * Fair delivery between tenants within a subscription (src/postgres/consume/fair.ts): a noisy tenant whose
 * backlog fills a batch does not hold up the quiet tenants' messages read with it, each key keeps its
 * order, and weights give a tenant a larger share. Measured in messages handled, not milliseconds, so a
 * busy machine does not change the verdict.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { SubscribeOptions } from '../src/index.ts';
import { pgWorld } from './fixtures/bus.ts';
import { noisyBacklogRun, type FairRun } from './fixtures/fairness.ts';

/** The scenario (fixtures/fairness.ts) on a fresh schema: one partition, so the noisy keys are read first. */
async function run(t: Parameters<typeof pgWorld>[0], options: SubscribeOptions): Promise<FairRun | undefined> {
  const world = await pgWorld(t, 'fair');
  if (world === undefined) return undefined;
  return noisyBacklogRun(world.bus(), { partitions: 1, batchSize: 500, inbox: false, ...options });
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
});

test('fair delivery: a weight gives a tenant a larger share of the slots', async (t) => {
  const weighted = await run(t, { tenantConcurrency: 1, tenantWeights: { noisy: 3 } });
  if (weighted === undefined) return;
  assert.equal(weighted.peakNoisy, 3, 'three noisy keys in flight at once');
});
