/**
 * Per-tenant publish quotas on the brokers (outbox/index.ts): with an outbox, two processes' buses share one
 * budget per tenant through the outbox database's table; without one, each process has its own (as
 * docs/tenancy.md says). Counted: what gets through of what is asked at once. And fair shares, which the
 * brokers do not offer: a subscription asking for them is warned, not silently ignored.
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

test('RabbitMQ and NATS: a subscription with tenantConcurrency or tenantWeights is warned that they apply on PostgreSQL only', async (t) => {
  const warnings: string[] = [];
  const onWarning = (message: string) => void warnings.push(message);
  const rabbit = await requireBroker(t, 'RabbitMQ', RABBITMQ_URL);
  if (rabbit) {
    const harness = new Harness();
    t.after(() => harness.cleanup());
    const bus = harness.bus('fair', { rabbit: { onWarning } });
    bus.subscribe('fair-rabbit', Ticked, () => undefined, { tenantConcurrency: 2 });
    bus.subscribe('plain-rabbit', Ticked, () => undefined);
    await bus.start();
  }
  const space = await natsNamespace(t, 'fair');
  if (space !== undefined) {
    t.after(() => space.cleanup());
    const bus = createBus({ service: 'fair', backbone: nats({ ...space.options(), onWarning }) });
    t.after(() => bus.stop());
    bus.subscribe('fair-nats', Ticked, () => undefined, { tenantWeights: { acme: 3 } });
    bus.subscribe('plain-nats', Ticked, () => undefined);
    await bus.start();
  }
  const about = (name: string) => warnings.filter((warning) => warning.startsWith(`Subscription ${name}:`));
  if (rabbit) {
    assert.equal(about('fair-rabbit').length, 1);
    assert.match(about('fair-rabbit')[0]!, /apply on PostgreSQL only, and are ignored on RabbitMQ; .*a vhost of its own with tenantStamps/);
  }
  if (space !== undefined) {
    assert.equal(about('fair-nats').length, 1);
    assert.match(about('fair-nats')[0]!, /ignored on NATS; .*a subject prefix of its own/);
  }
  assert.deepEqual([...about('plain-rabbit'), ...about('plain-nats')], [], 'no warning without the options');
});
