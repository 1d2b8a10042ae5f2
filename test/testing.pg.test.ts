/** The payment story of the test kit (test/fixtures/payment-story.ts) on a real PostgreSQL, by passing its backbone. */
import { test } from 'node:test';
import { postgres } from '../src/postgres/index.ts';
import { testBus, type TestBus } from '../src/testing/index.ts';
import { paymentStory } from './fixtures/payment-story.ts';
import { DATABASE_URL, dropSchema, requirePostgres, uniqueSchema } from './helpers.ts';

test('the same story on PostgreSQL, by passing its backbone', async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('kit');
  const kit = testBus({ backbone: postgres({ url: DATABASE_URL, schema, leaseMs: 2_000, heartbeatMs: 500, pollMs: 1_000, onWarning: () => undefined }) });
  t.after(async () => {
    await kit.stop();
    await dropSchema(schema);
  });
  await paymentStory(kit as TestBus<unknown>);
});
