/** The demo's payment saga on a real PostgreSQL: the story of test/shop.unit.test.ts, by passing the backbone. */
import { test } from 'node:test';
import { postgres } from '../src/postgres/index.ts';
import { testBus, type TestBus } from '../src/testing/index.ts';
import { shopPaymentStory } from './fixtures/shop-story.ts';
import { DATABASE_URL, dropSchema, requirePostgres, uniqueSchema } from './helpers.ts';

test("the shop's payment saga on PostgreSQL: the same story, with a real one-second timeout", async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('shop');
  const kit = testBus({ backbone: postgres({ url: DATABASE_URL, schema, leaseMs: 2_000, heartbeatMs: 500, pollMs: 1_000, onWarning: () => undefined }) });
  t.after(async () => {
    await kit.stop();
    await dropSchema(schema);
  });
  await shopPaymentStory(kit as TestBus<unknown>, 1_000);
});
