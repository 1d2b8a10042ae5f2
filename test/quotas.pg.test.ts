/**
 * Per-tenant publish quotas on PostgreSQL (core/quotas.ts, postgres/quotas.ts, migration 015): processes
 * publishing for one tenant share its budget, other tenants keep theirs, 'wait' waits instead of refusing,
 * hostile tenant ids never reach the buckets, and what handlers publish is not counted. The tests count
 * messages accepted and refused; the only clock they read bounds how many tokens a window can have made.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createBus, TenantRateLimitedError, TidingsError } from '../src/index.ts';
import { postgres, purgeTenant, showTenant, type PostgresBackbone } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { startProcess } from './fixtures/processes.ts';
import { publishFor } from './fixtures/quotas.ts';
import { connect, DATABASE_URL, waitFor } from './helpers.ts';
import { PostgresTokenBuckets } from '../src/postgres/quotas.ts';

const rate = { ratePerSecond: 10, burst: 5 };

test('several processes publishing for one tenant share its budget: what they all get through is at most burst + rate × the window', async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const quotas = { default: rate };
  // Two buses here (a pool each) and two child processes: four publishers of one tenant.
  const buses = [world.bus('a', { tenancy: { quotas } }), world.bus('b', { tenancy: { quotas } })];
  await Promise.all(buses.map((bus) => bus.start()));
  const env = { SCHEMA: world.schema, TENANT: 'acme', RATE: String(rate.ratePerSecond), BURST: String(rate.burst) };
  const children = await Promise.all([startProcess('quota-publisher', env), startProcess('quota-publisher', env)]);
  t.after(() => Promise.all(children.map((child) => child.stop())));

  const start = Date.now() + 300;
  const end = start + 2_000;
  const results = children.map((child) => child.nextLine(/^accepted/, 30_000));
  for (const child of children) child.child.stdin!.write(`publish ${start} ${end}\n`);
  const here = await Promise.all(buses.map((bus) => publishFor(bus, Ticked, 'acme', start, end)));
  const there = (await Promise.all(results)).map((line) => {
    const [, accepted, , refused] = line.split(' ');
    return { accepted: Number(accepted), refused: Number(refused) };
  });
  const finished = Date.now();
  const all = [...here, ...there];
  const accepted = all.reduce((sum, one) => sum + one.accepted, 0);
  const refused = all.reduce((sum, one) => sum + one.refused, 0);
  // Every grant happened between the first take (at or after `start`) and the last (before `finished`).
  const most = rate.burst + (rate.ratePerSecond * (finished - start)) / 1_000;
  t.diagnostic(
    `four publishers: ${accepted} accepted, ${refused} refused; one budget allows ${most.toFixed(1)}, four would allow about ${(4 * most).toFixed(0)}`,
  );
  assert.ok(accepted <= most + 1, `${accepted} accepted by four publishers; one shared budget allows at most ${most.toFixed(1)}`);
  assert.ok(accepted >= rate.burst, `${accepted} accepted: at least the burst gets through`);
  assert.ok(refused > 0, 'four publishers asked for more than the budget');
  assert.ok(
    all.every((one) => one.accepted > 0 || one.refused > 0),
    'every publisher took part',
  );
  const client = await connect();
  t.after(() => client.end());
  const { rows } = await client.query(`select count(*)::int as n from "${world.schema}".log where tenant = 'acme'`);
  assert.equal(rows[0].n, accepted, 'what was accepted is in the log, and nothing refused is');
});

test('over its quota a publish fails with TENANT_RATE_LIMITED naming the tenant and contract, with retryAfterMs; other tenants keep their own budget', async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const bus = world.bus('shop', { tenancy: { quotas: { default: rate, tenants: { vip: { ratePerSecond: 1_000, burst: 100 } } } } });
  await bus.start();
  // Asked at once, so the bucket cannot refill between them: the burst goes through, the rest is refused.
  const settled = await Promise.allSettled(Array.from({ length: 20 }, (_, seq) => bus.publish(Ticked, { key: 'a', seq }, { tenant: 'acme' })));
  const accepted = settled.filter((one) => one.status === 'fulfilled').length;
  const refusal = settled.find((one) => one.status === 'rejected')?.reason;
  assert.ok(refusal instanceof TenantRateLimitedError, `refused with ${String(refusal)}`);
  assert.equal(refusal.code, 'TENANT_RATE_LIMITED');
  assert.equal(refusal.tenant, 'acme');
  assert.equal(refusal.contract, Ticked.name);
  assert.equal(refusal.ref?.topic, Ticked.topic);
  assert.ok(refusal.retryAfterMs > 0 && refusal.retryAfterMs <= 1_000 / rate.ratePerSecond, `retryAfterMs ${refusal.retryAfterMs}: one token at 10/s`);
  assert.equal(refusal.retryable, true);
  assert.match(refusal.message, /tenant acme.*10 messages\/s \(burst 5\).*try again in \d+ ms/);
  assert.ok(accepted >= rate.burst && accepted < 10, `the burst got through, then refusals (${accepted} accepted)`);
  const shown = await showTenant((bus.backbone as PostgresBackbone).driver, { schema: world.schema, tenant: 'acme' });
  assert.ok(shown.quota !== undefined && shown.quota.tokens < 1, `tidings tenants show: ${JSON.stringify(shown.quota)} tokens left`);

  // acme is out of tokens; globex (the default rate, its own bucket) and vip (its own rate) are not.
  for (let seq = 0; seq < rate.burst; seq++) await bus.publish(Ticked, { key: 'g', seq }, { tenant: 'globex' });
  await bus.publishMany(
    Ticked,
    Array.from({ length: 100 }, (_, seq) => ({ key: 'v', seq })),
    { tenant: 'vip' },
  );
  // A message without a tenant is not limited.
  for (let seq = 0; seq < rate.burst * 2; seq++) await bus.publish(Ticked, { key: 'n', seq });
  // A publishMany over the burst waits for a full bucket and leaves a debt, rather than failing for ever.
  const many = await bus.publishMany(
    Ticked,
    Array.from({ length: 30 }, (_, seq) => ({ key: 'm', seq })),
    { tenant: 'globex2' },
  );
  assert.equal(many.length, 30);
  await assert.rejects(bus.publish(Ticked, { key: 'm', seq: 31 }, { tenant: 'globex2' }), (error: unknown) => {
    assert.ok(error instanceof TenantRateLimitedError);
    assert.ok(error.retryAfterMs > 1_000, `in debt by 25 tokens at 10/s: ${error.retryAfterMs} ms`);
    return true;
  });
});

test("onLimit 'wait': publishes over the quota wait for their tokens instead of failing; past maxWaitMs they fail", async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const bus = world.bus('shop', { tenancy: { quotas: { default: { ratePerSecond: 20, burst: 2 }, onLimit: 'wait', maxWaitMs: 5_000 } } });
  await bus.start();
  const started = Date.now();
  const published = await Promise.all(Array.from({ length: 12 }, (_, seq) => bus.publish(Ticked, { key: `k${seq}`, seq }, { tenant: 'acme' })));
  assert.equal(published.length, 12, 'every publish went through');
  // 10 messages beyond the burst at 20/s: the bucket cannot have made their tokens in less than 0.5 s.
  assert.ok(Date.now() - started >= 450, `12 publishes took ${Date.now() - started} ms`);

  const impatient = world.bus('impatient', { tenancy: { quotas: { default: { ratePerSecond: 1, burst: 1 }, onLimit: 'wait', maxWaitMs: 100 } } });
  await impatient.start();
  await impatient.publish(Ticked, { key: 'x', seq: 1 }, { tenant: 'slow' });
  await assert.rejects(impatient.publish(Ticked, { key: 'x', seq: 2 }, { tenant: 'slow' }), /TENANT_RATE_LIMITED|over its quota/);
});

test('hostile tenant ids never reach the buckets; bad quota options are refused by name', async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const bus = world.bus('shop', { tenancy: { quotas: { default: rate } } });
  await bus.start();
  for (const [tenant, code] of [
    ["acme'; drop table log; --", 'INVALID_TENANT'],
    ['ac\0me', 'INVALID_TENANT'],
    [' acme', 'INVALID_TENANT'],
    ['x'.repeat(10_000), 'LIMIT_EXCEEDED'],
  ] as const) {
    await assert.rejects(bus.publish(Ticked, { key: 'k', seq: 1 }, { tenant }), (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === code, `${JSON.stringify(tenant.slice(0, 30))}: ${String(error)}`);
      return true;
    });
    await assert.rejects(
      async () => bus.withTenant(tenant, () => bus.publish(Ticked, { key: 'k', seq: 1 })),
      (error: unknown) => error instanceof TidingsError && error.code === code,
    );
  }
  const client = await connect();
  t.after(() => client.end());
  const { rows } = await client.query(`select count(*)::int as n from "${world.schema}".tenant_quotas`);
  assert.equal(rows[0].n, 0, 'no bucket was made for them');

  const refused = (quotas: unknown) => () => postgres({ url: DATABASE_URL, tenancy: { quotas: quotas as never } });
  assert.throws(refused({ tenants: { "a'b": rate } }), /tenancy\.quotas\.tenants: tenant "a'b" is not a tenant id/);
  assert.throws(refused({ default: { ratePerSecond: 0 } }), /tenancy\.quotas\.default\.ratePerSecond must be a number from 0\.001/);
  assert.throws(refused({ default: { burst: 5 } }), /tenancy\.quotas\.default\.ratePerSecond is required/);
  assert.throws(refused({ default: { ratePerSecond: 5, burst: 1.5 } }), /tenancy\.quotas\.default\.burst must be an integer/);
  assert.throws(refused({ onLimit: 'drop' }), /tenancy\.quotas\.onLimit must be one of "reject", "wait"/);
  assert.throws(refused({ defualt: rate }), /tenancy\.quotas\.defualt is not an option: did you mean tenancy\.quotas\.default\?/);
});

test('what handlers publish for their tenant is not counted: a tenant over its quota still finishes its work', async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const bus = world.bus('shop', { tenancy: { quotas: { default: { ratePerSecond: 1, burst: 3 } } } });
  let followed = 0;
  bus.subscribe('follow', Ticked, async (message, ctx) => {
    if (message.data.note === 'next') followed++;
    else await ctx.publish(Ticked, { key: message.data.key, seq: message.data.seq, note: 'next' });
  });
  await bus.start();
  for (let seq = 0; seq < 3; seq++) await bus.publish(Ticked, { key: `k${seq}`, seq }, { tenant: 'acme' });
  await assert.rejects(bus.publish(Ticked, { key: 'k', seq: 9 }, { tenant: 'acme' }), TenantRateLimitedError);
  await waitFor('the handlers publishing for acme', () => followed === 3);
  const stats = bus.stats().subscriptions.follow!;
  assert.equal(stats.retried + stats.deadLettered, 0, 'no handler was refused');
});

test('the purge of a tenant removes its bucket', async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const bus = createBus({ service: 'shop', backbone: world.backbone({ tenancy: { quotas: { default: rate } } }) });
  t.after(() => bus.stop());
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 1 }, { tenant: 'acme' });
  const purged = await purgeTenant((bus.backbone as PostgresBackbone).driver, { schema: world.schema, tenant: 'acme', actor: 'test' });
  assert.equal(purged.rows.tenant_quotas, 1);
  await bus.publish(Ticked, { key: 'k', seq: 2 }, { tenant: 'acme' });
});

test('a fast tenant takes tokens ahead: far fewer statements than publishes, and never more through than its bucket made', async (t) => {
  const world = await pgWorld(t, 'tquo');
  if (world === undefined) return;
  const backbone = world.backbone();
  t.after(() => backbone.close());
  await backbone.open();
  let statements = 0;
  const counted = new Proxy(backbone.driver, {
    get(target, name, receiver) {
      const value = Reflect.get(target, name, receiver);
      if (name !== 'query' && name !== 'prepared') return value;
      return (...args: unknown[]) => {
        statements++;
        return (value as (...args: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  const buckets = new PostgresTokenBuckets(() => counted, world.schema);
  const takes = async (tenant: string, rate: { ratePerSecond: number; burst: number }) => {
    const [before, started] = [statements, Date.now()];
    let granted = 0;
    for (let i = 0; i < 1_000; i++) if ((await buckets.take(tenant, rate, 1)) === 0) granted++;
    return { granted, statements: statements - before, most: rate.burst + (rate.ratePerSecond * (Date.now() - started)) / 1_000 };
  };
  // Under its rate: each take brings 100 tokens along (the most: 50 ms of it would be 5,000), and the next publishes use them.
  const roomy = await takes('roomy', { ratePerSecond: 100_000, burst: 10_000 });
  // At its rate: each take brings what the bucket has to spare, which is little.
  const busy = await takes('busy', { ratePerSecond: 2_000, burst: 200 });
  t.diagnostic(
    `1,000 asked under the rate: ${roomy.granted} granted, ${roomy.statements} statements; at it: ${busy.granted} granted (at most ${busy.most.toFixed(0)}), ${busy.statements} statements`,
  );
  assert.equal(roomy.granted, 1_000);
  assert.ok(roomy.statements <= 40, `${roomy.statements} statements for 1,000 takes under the rate: the tokens taken ahead serve them`);
  assert.ok(busy.granted <= busy.most + 1, `${busy.granted} granted; the bucket made at most ${busy.most.toFixed(1)}`);
  assert.ok(busy.granted >= 200, `at least the burst (${busy.granted})`);
});
