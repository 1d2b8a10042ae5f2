/**
 * Per-tenant publish quotas on the brokers (outbox/index.ts): with an outbox, two processes' buses share one
 * budget per tenant through the outbox database's table; without one, each process has its own (as
 * docs/tenancy.md says). Counted: what gets through of what is asked at once.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TenantRateLimitedError } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { natsNamespace } from './fixtures/nats.ts';
import { Harness } from './fixtures/rabbitmq.ts';
import { DATABASE_URL, dropSchema, RABBITMQ_URL, requireBroker, uniqueSchema } from './helpers.ts';
import { createBus } from '../src/index.ts';

/** Three tokens, and (almost) none more during the test: what gets through is what the bucket held. */
const quotas = { default: { ratePerSecond: 0.001, burst: 3 } };

/** Asks for 5 messages of `tenant` at once; returns how many went through, checking that the rest were refused over the quota. */
async function accepted(bus: ReturnType<Harness['bus']>, tenant: string): Promise<number> {
  const settled = await Promise.allSettled(Array.from({ length: 5 }, (_, seq) => bus.publish(Ticked, { key: `k${seq}`, seq }, { tenant })));
  for (const one of settled) if (one.status === 'rejected') assert.ok(one.reason instanceof TenantRateLimitedError, String(one.reason));
  return settled.filter((one) => one.status === 'fulfilled').length;
}

test('RabbitMQ: without an outbox each process has its own budget; with one, the processes share it', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return;
  const harness = new Harness();
  t.after(() => harness.cleanup());
  const alone = [harness.bus('a', { rabbit: { tenancy: { quotas } } }), harness.bus('b', { rabbit: { tenancy: { quotas } } })];
  await Promise.all(alone.map((bus) => bus.start()));
  assert.deepEqual([await accepted(alone[0]!, 'acme'), await accepted(alone[1]!, 'acme')], [3, 3], 'a budget per process');

  const shared = [harness.bus('c', { outbox: true, rabbit: { tenancy: { quotas } } }), harness.bus('d', { outbox: true, rabbit: { tenancy: { quotas } } })];
  await Promise.all(shared.map((bus) => bus.start()));
  assert.equal((await accepted(shared[0]!, 'acme')) + (await accepted(shared[1]!, 'acme')), 3, "one budget, in the outbox's table");
});

test("NATS with an outbox: the outbox's own tenancy.quotas apply when the broker backbone names none", async (t) => {
  const space = await natsNamespace(t, 'quo');
  if (space === undefined) return;
  t.after(() => space.cleanup());
  const schema = uniqueSchema('nq');
  t.after(() => dropSchema(schema));
  const buses = ['a', 'b'].map((service) =>
    createBus({
      service,
      backbone: nats({ ...space.options(), outbox: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined, tenancy: { quotas } }) }),
    }),
  );
  t.after(() => Promise.all(buses.map((bus) => bus.stop())));
  await Promise.all(buses.map((bus) => bus.start()));
  assert.equal((await accepted(buses[0]!, 'acme')) + (await accepted(buses[1]!, 'acme')), 3);
  assert.equal(await accepted(buses[0]!, 'globex'), 3, 'another tenant has its own budget');
});
