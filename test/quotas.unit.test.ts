/**
 * The quotas' policy and the in-process buckets (core/quotas.ts), on a clock the test moves: a bucket holds
 * its burst, refills at its rate, never above the burst; a request over the burst needs a full bucket and
 * leaves a debt; 'reject' refuses with retryAfterMs, 'wait' waits up to maxWaitMs. The options' defaults.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { createBus, defineEvent, TenantRateLimitedError } from '../src/index.ts';
import { memory } from '../src/memory/index.ts';
import { VirtualClock } from '../src/testing/index.ts';
import { OptionProblems, quotaDefaults, quotaProblems, resolveQuotas } from '../src/core/options.ts';
import { LocalTokenBuckets, TenantQuotas } from '../src/core/quotas.ts';

const Placed = defineEvent('shop.placed', { schema: z.object({ orderId: z.string() }) });

test('a bucket: the burst at once, then the rate; never more than the burst; a request over the burst leaves a debt', async () => {
  let now = 0;
  const buckets = new LocalTokenBuckets(() => now);
  const rate = { ratePerSecond: 2, burst: 3 };
  assert.deepEqual([await buckets.take('acme', rate, 1), await buckets.take('acme', rate, 1), await buckets.take('acme', rate, 1)], [0, 0, 0]);
  assert.equal(await buckets.take('acme', rate, 1), 500, 'empty: one token comes in 500 ms at 2/s');
  now += 500;
  assert.equal(await buckets.take('acme', rate, 1), 0);
  now += 60_000;
  assert.equal(await buckets.take('acme', rate, 3), 0, 'a quiet minute fills the bucket to its burst');
  assert.equal(await buckets.take('acme', rate, 1), 500, 'and no further');
  assert.equal(await buckets.take('globex', rate, 3), 0, 'each tenant has its own bucket');

  now += 1_500;
  assert.equal(await buckets.take('acme', rate, 10), 0, 'ten at once, over the burst of 3: taken from a full bucket');
  assert.equal(await buckets.take('acme', rate, 1), 4_000, 'in debt by 7: 8 tokens to come at 2/s');
  now += 1_000;
  assert.equal(await buckets.take('acme', rate, 10), 4_000, 'over the burst again: waits for a full bucket (from -5 to 3 at 2/s)');
});

test("the policy: 'reject' refuses with TENANT_RATE_LIMITED and retryAfterMs; 'wait' waits for the tokens, up to maxWaitMs; unlimited tenants pass", async () => {
  const quotas = (onLimit: 'reject' | 'wait', maxWaitMs = 1_000) =>
    new TenantQuotas(
      resolveQuotas({ default: { ratePerSecond: 50, burst: 1 }, tenants: { vip: { ratePerSecond: 1_000 } }, onLimit, maxWaitMs }),
      new LocalTokenBuckets(),
    );
  const reject = quotas('reject');
  await reject.admit('acme', Placed, 1);
  await assert.rejects(reject.admit('acme', Placed, 1), (error: unknown) => {
    assert.ok(error instanceof TenantRateLimitedError);
    assert.equal(error.code, 'TENANT_RATE_LIMITED');
    assert.equal(error.tenant, 'acme');
    assert.equal(error.contract, 'shop.placed');
    assert.ok(error.retryAfterMs > 0 && error.retryAfterMs <= 20, `retryAfterMs ${error.retryAfterMs}`);
    assert.match(error.message, /Cannot publish shop\.placed for tenant acme: over its quota of 50 messages\/s \(burst 1\); try again in \d+ ms/);
    return true;
  });
  for (let i = 0; i < 100; i++) await reject.admit('vip', Placed, 1);

  const wait = quotas('wait');
  await Promise.all(Array.from({ length: 5 }, () => wait.admit('acme', Placed, 1)));
  const impatient = quotas('wait', 0);
  await impatient.admit('acme', Placed, 1);
  await assert.rejects(impatient.admit('acme', Placed, 1), /it waited \d+ ms; waiting on would pass maxWaitMs, 0 ms/);

  const closing = quotas('wait', 60_000);
  await closing.admit('acme', Placed, 20);
  const waiting = closing.admit('acme', Placed, 1);
  closing.close();
  await assert.rejects(waiting, /STOPPED|closed while it waited/);
});

test('quota options: defaults in one place, each bad one named', () => {
  assert.deepEqual(quotaDefaults, { onLimit: 'reject', maxWaitMs: 30_000, burstSeconds: 1 });
  const resolved = resolveQuotas({ default: { ratePerSecond: 2.5 }, tenants: { acme: { ratePerSecond: 0.1 } } });
  assert.deepEqual(resolved.default, { ratePerSecond: 2.5, burst: 3 }, 'the burst defaults to one second of the rate, rounded up');
  assert.deepEqual(resolved.tenants.get('acme'), { ratePerSecond: 0.1, burst: 1 }, 'and to at least one message');
  assert.equal(resolved.onLimit, 'reject');
  const problems = new OptionProblems('postgres()');
  quotaProblems(
    problems,
    { default: { ratePerSecond: -1 }, tenants: { 'a"b': { ratePerSecond: 1 } }, onLimit: 'drop' as never, maxWaitMs: -5 },
    'tenancy.quotas.',
  );
  assert.throws(
    () => problems.throwIfAny(),
    (error: Error) =>
      ['tenancy.quotas.onLimit', 'tenancy.quotas.maxWaitMs', 'tenancy.quotas.default.ratePerSecond', 'tenancy.quotas.tenants: tenant "a\\"b"'].every((name) =>
        error.message.includes(name),
      ),
  );
});

test("the memory backbone's quotas: a budget per tenant on its clock; 'reject' past the burst, 'wait' until the clock brings tokens; nothing published past the limit", async () => {
  const clock = new VirtualClock(0);
  const reject = memory({ clock, tenancy: { quotas: { default: { ratePerSecond: 10, burst: 2 } } } });
  const bus = createBus({ service: 'shop', backbone: reject, clock });
  await bus.withTenant('acme', () => bus.publish(Placed, { orderId: 'o1' }));
  await bus.withTenant('acme', () => bus.publish(Placed, { orderId: 'o2' }));
  await assert.rejects(
    bus.withTenant('acme', () => bus.publish(Placed, { orderId: 'o3' })),
    (error: unknown) => error instanceof TenantRateLimitedError && error.tenant === 'acme' && error.retryAfterMs === 100,
  );
  await bus.withTenant('globex', () => bus.publish(Placed, { orderId: 'g1' }));
  await clock.advance(100);
  await bus.withTenant('acme', () => bus.publish(Placed, { orderId: 'o3' }));
  assert.deepEqual(
    reject.messages(Placed.topic).map((m) => `${m.tenant}:${(m.data as { orderId: string }).orderId}`),
    ['acme:o1', 'acme:o2', 'globex:g1', 'acme:o3'],
    'the refused publish left nothing behind',
  );

  const waitClock = new VirtualClock(0);
  const waiting = memory({ clock: waitClock, tenancy: { quotas: { default: { ratePerSecond: 1, burst: 1 }, onLimit: 'wait', maxWaitMs: 60_000 } } });
  const waitBus = createBus({ service: 'shop', backbone: waiting, clock: waitClock });
  await waitBus.withTenant('acme', () => waitBus.publish(Placed, { orderId: 'w1' }));
  let done = false;
  const second = waitBus
    .withTenant('acme', () => waitBus.publish(Placed, { orderId: 'w2' }))
    .then(() => {
      done = true;
    });
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(done, false, 'the second waits for a token');
  await waitClock.advance(1_000);
  await second;
  assert.equal(waiting.messages(Placed.topic).length, 2);

  assert.throws(() => memory({ tenancy: { quotas: { default: { ratePerSecond: 0 } } } }), /tenancy\.quotas\.default\.ratePerSecond/);
});
