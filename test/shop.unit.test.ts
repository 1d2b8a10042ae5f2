/** The demo's payment saga in memory, with tidings/testing's virtual clock: three seconds pass at once. */
import { test } from 'node:test';
import { testBus, type TestBus } from '../src/testing/index.ts';
import { shopPaymentStory } from './fixtures/shop-story.ts';

test("the shop's payment saga: charged, refused, timed out and compensated, a late answer ignored", async (t) => {
  const kit = testBus();
  t.after(() => kit.stop());
  await shopPaymentStory(kit as TestBus<unknown>, 3_000);
});
