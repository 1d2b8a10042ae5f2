/**
 * A backbone per tenant (tidings/stamps) over memory backbones: routing by tenant, the errors, transactions,
 * stamps added at run time, a stamp that cannot open, dead letters and health named by tenant. The same on
 * real servers: stamps.pg.test.ts, stamps.brokers.test.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createBus, deadLetter, type TidingsError, type Bus } from '../src/index.ts';
import { memory, type MemoryBackbone, type MemoryTransaction } from '../src/memory/index.ts';
import { tenantStamps, type TenantStamps, type TenantStampsOptions } from '../src/stamps/index.ts';
import { Quote } from './fixtures/contracts.ts';
import { Counter, CounterAdded, CounterStarted } from './fixtures/counter-saga.ts';
import { waitFor } from './helpers.ts';
import { Invoiced, Placed } from './fixtures/stamps.ts';

interface World {
  readonly stamps: TenantStamps<MemoryTransaction>;
  readonly backbones: Map<string, MemoryBackbone>;
  readonly bus: Bus<MemoryTransaction>;
  readonly warnings: string[];
}

/** Stamps of memory backbones, one per tenant; `down` tenants' backbones refuse to open until `down` forgets them. */
function world(
  t: { after(fn: () => Promise<void>): void },
  tenants: string[],
  down = new Set<string>(),
  options: Partial<TenantStampsOptions<MemoryTransaction>> = {},
): World {
  const backbones = new Map<string, MemoryBackbone>();
  const warnings: string[] = [];
  const stamps = tenantStamps<MemoryTransaction>({
    ...options,
    tenants,
    reopenMs: 20,
    onWarning: (message) => warnings.push(message),
    backbone: (tenant) => {
      const backbone = memory();
      const open = backbone.open.bind(backbone);
      backbone.open = async () => {
        if (down.has(tenant)) throw new Error(`${tenant} is down`);
        await open();
      };
      backbones.set(tenant, backbone);
      return backbone;
    },
  });
  const bus = createBus({ service: 'shop', backbone: stamps });
  t.after(() => bus.stop());
  return { stamps, backbones, bus, warnings };
}

const topics = (backbone: MemoryBackbone | undefined) => (backbone?.messages() ?? []).map((m) => `${m.topic}:${m.tenant}`);

test('each message is written to its tenant stamp only; without a tenant or for an unknown one, a clear error', async (t) => {
  const { bus, backbones } = world(t, ['acme', 'globex']);
  await bus.start();
  await bus.withTenant('acme', () => bus.publish(Placed, { key: 'a', seq: 1 }));
  await bus.publish(Placed, { key: 'g', seq: 1 }, { tenant: 'globex' });
  await bus.publish(Placed, { key: 'g', seq: 2 }, { tenant: 'globex' });
  assert.deepEqual(topics(backbones.get('acme')), ['stamps.placed:acme']);
  assert.deepEqual(topics(backbones.get('globex')), ['stamps.placed:globex', 'stamps.placed:globex']);

  await assert.rejects(bus.publish(Placed, { key: 'x', seq: 1 }), (error: TidingsError) => {
    assert.equal(error.code, 'TENANT_REQUIRED');
    assert.match(error.message, /stamps\.placed .*without a tenant.*withTenant/);
    return true;
  });
  await assert.rejects(bus.publish(Placed, { key: 'x', seq: 1 }, { tenant: 'initech' }), (error: TidingsError) => {
    assert.equal(error.code, 'TENANT_UNKNOWN');
    assert.match(error.message, /tenant initech has no stamp \(the stamps are acme, globex\)\. Add it with backbone\.addTenant\('initech'\)/);
    return true;
  });
  await assert.rejects(
    bus.transaction(async () => undefined),
    { code: 'TENANT_REQUIRED', message: /bus\.transaction\(\) needs a tenant/ },
  );
  assert.throws(
    () => tenantStamps({ tenants: ['ok', "bad'quote", 'ok'], backbone: () => memory() }),
    (error: TidingsError) => {
      assert.equal(error.code, 'INVALID_OPTIONS');
      assert.match(error.message, /tenants: tenant "bad'quote" is not a tenant id/);
      assert.match(error.message, /lists a tenant twice/);
      return true;
    },
  );
});

test("a subscription runs on every stamp; what a handler publishes goes to its message's stamp, in its transaction", async (t) => {
  const { bus, backbones, stamps } = world(t, ['acme', 'globex']);
  const seen: string[] = [];
  bus.subscribe('billing', Placed, async (message, ctx) => {
    seen.push(`${message.tenant}:${message.data.seq}`);
    await ctx.publish(Invoiced, message.data);
  });
  await bus.start();
  await bus.withTenant('acme', () =>
    bus.transaction((tx) =>
      bus.publishMany(
        Placed,
        [1, 2].map((seq) => ({ key: 'k', seq })),
        { tx },
      ),
    ),
  );
  await bus.publish(Placed, { key: 'k', seq: 3 }, { tenant: 'globex' });
  await Promise.all([...backbones.values()].map((backbone) => backbone.drain()));
  assert.deepEqual(seen.sort(), ['acme:1', 'acme:2', 'globex:3']);
  assert.deepEqual(
    topics(backbones.get('acme')).filter((m) => m.startsWith('stamps.invoiced')),
    ['stamps.invoiced:acme', 'stamps.invoiced:acme'],
  );
  assert.deepEqual(
    topics(backbones.get('globex')).filter((m) => m.startsWith('stamps.invoiced')),
    ['stamps.invoiced:globex'],
  );

  // A tenant added at run time gets the running subscriptions.
  await stamps.addTenant('initech');
  await bus.publish(Placed, { key: 'k', seq: 4 }, { tenant: 'initech' });
  await backbones.get('initech')!.drain();
  assert.ok(seen.includes('initech:4'));
  assert.deepEqual(stamps.tenants(), ['acme', 'globex', 'initech']);
  await assert.rejects(stamps.addTenant('acme'), /has a stamp already/);

  // A transaction of one tenant's stamp refuses another tenant's message.
  await assert.rejects(
    bus.withTenant('acme', () => bus.transaction((tx) => bus.publish(Placed, { key: 'k', seq: 5 }, { tx, tenant: 'globex' }))),
    (error: TidingsError) => {
      assert.equal(error.code, 'TENANT_FORBIDDEN');
      assert.match(error.message, /for tenant globex in a transaction of tenant acme's stamp/);
      return true;
    },
  );
});

test('a stamp that cannot open holds up its tenant alone, and joins once it opens', async (t) => {
  const down = new Set(['globex']);
  const { bus, backbones, warnings } = world(t, ['acme', 'globex'], down);
  const seen: string[] = [];
  bus.subscribe('billing', Placed, (message) => {
    seen.push(`${message.tenant}:${message.data.seq}`);
  });
  await bus.start();
  assert.match(warnings[0] ?? '', /stamp of tenant globex could not open \(globex is down\).*tried again every 20 ms/);
  await bus.publish(Placed, { key: 'k', seq: 1 }, { tenant: 'acme' });
  await assert.rejects(bus.publish(Placed, { key: 'k', seq: 2 }, { tenant: 'globex' }), (error: TidingsError) => {
    assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
    assert.match(error.message, /stamp of tenant globex is unavailable \(globex is down\); the other tenants' stamps are not affected/);
    return true;
  });
  // Readiness 'any' (the default): acme runs, so the process stays in service; globex's failure is listed.
  const health = await bus.health();
  assert.equal(health.ready, true);
  assert.deepEqual(
    health.checks.filter((check) => check.name.startsWith('globex')).map((check) => [check.name, check.detail]),
    [['globex: stamp', "failing: not open: globex is down (this tenant alone waits; readiness: 'any')"]],
  );
  // Readiness 'every': one stamp down is the process unready.
  const strict = world(t, ['acme', 'globex'], down, { readiness: 'every' });
  await strict.bus.start();
  assert.equal((await strict.bus.health()).ready, false);
  down.delete('globex');
  await waitFor('globex to open', async () => (await bus.health()).checks.every((check) => !check.detail.startsWith('failing')));
  assert.match(warnings.at(-1) ?? '', /stamp of tenant globex is open now/);
  await bus.publish(Placed, { key: 'k', seq: 3 }, { tenant: 'globex' });
  await waitFor('globex to be handled', () => seen.includes('globex:3'));
  await backbones.get('acme')!.drain();
  assert.deepEqual(seen.sort(), ['acme:1', 'globex:3']);
});

test('dead letters of every stamp, named by tenant, redriven per tenant', async (t) => {
  const { bus, backbones, stamps } = world(t, ['acme', 'globex']);
  let fail = true;
  const handled: string[] = [];
  bus.subscribe('billing', Placed, (message) => {
    if (fail) return deadLetter('card declined');
    handled.push(`${message.tenant}:${message.data.seq}`);
  });
  await bus.start();
  await bus.publish(Placed, { key: 'k', seq: 1 }, { tenant: 'acme' });
  await bus.publish(Placed, { key: 'k', seq: 2 }, { tenant: 'globex' });
  await Promise.all([...backbones.values()].map((backbone) => backbone.drain()));
  const store = stamps.deadLetters();
  const { total, deadLetters } = await store.list({ all: true });
  assert.equal(total, 2);
  assert.deepEqual(deadLetters.map((letter) => letter.tenant).sort(), ['acme', 'globex']);
  const acme = deadLetters.find((letter) => letter.tenant === 'acme')!;
  assert.ok(acme.id.startsWith('acme/'), acme.id);
  assert.equal((await store.show(acme.id))[0]?.envelope.tenant, 'acme');
  assert.equal((await store.show(acme.messageId)).length, 1);
  fail = false;
  const redriven = await store.redrive({ ids: [acme.id] });
  assert.equal(redriven.count, 1);
  await backbones.get('acme')!.drain();
  assert.deepEqual(handled, ['acme:1']);
  assert.equal(await store.count({ all: true }), 1);
  const groups = await store.group({ all: true });
  assert.deepEqual(
    groups.map((group) => [group.tenant, group.count]),
    [['globex', 1]],
  );
});

test('request/reply through the requesting tenant stamp', async (t) => {
  const { bus } = world(t, ['acme', 'globex']);
  bus.subscribe('pricer', Quote, (message) => ({ price: message.tenant === 'acme' ? 1 : 2 }));
  await bus.start();
  assert.deepEqual(await bus.withTenant('acme', () => bus.request(Quote, { key: 'k', n: 1 })), { price: 1 });
  assert.deepEqual(await bus.request(Quote, { key: 'k', n: 1 }, { tenant: 'globex' }), { price: 2 });
});

test("a saga's state lives in its tenant's stamp: one instance id, two tenants, two states; scheduled messages too", async (t) => {
  const { bus, stamps } = world(t, ['acme', 'globex']);
  bus.saga(Counter);
  const handled: string[] = [];
  bus.subscribe('billing', Placed, (message) => {
    handled.push(`${message.tenant}:${message.data.seq}`);
  });
  await bus.start();
  for (const [tenant, adds] of [
    ['acme', [1, 2]],
    ['globex', [10]],
  ] as const) {
    await bus.withTenant(tenant, async () => {
      await bus.publish(CounterStarted, { id: 'c1' });
      for (const [slot, n] of adds.entries()) await bus.publish(CounterAdded, { id: 'c1', n, slot });
    });
  }
  const state = (tenant: string) => bus.withTenant(tenant, () => stamps.sagas().find(Counter.name, 'c1'));
  await waitFor('both instances', async () => (await state('acme'))?.state !== undefined && (await state('globex'))?.state !== undefined);
  await waitFor('the adds', async () => (await state('acme'))!.version === 3 && (await state('globex'))!.version === 2);
  assert.deepEqual((await state('acme'))!.state, { id: 'c1', sum: 3, adds: 2 });
  assert.deepEqual((await state('globex'))!.state, { id: 'c1', sum: 10, adds: 1 });
  await assert.rejects(stamps.sagas().find(Counter.name, 'c1'), { code: 'TENANT_REQUIRED' });

  const [later] = await bus.publishMany(Placed, [{ key: 'k', seq: 1 }], { tenant: 'globex', delayMs: 60_000 });
  await bus.publish(Placed, { key: 'k', seq: 2 }, { tenant: 'acme', delayMs: 20 });
  assert.equal(await bus.cancelScheduled(later!.id), true);
  await waitFor("acme's scheduled message", () => handled.includes('acme:2'));
  assert.deepEqual(handled, ['acme:2']);
});

test('listeners hear of each stamp opening before it is used, of stamps open when they listen, and of stamps removed', async (t) => {
  const down = new Set(['globex']);
  const { bus, stamps, warnings } = world(t, ['acme', 'globex'], down);
  const heard: string[] = [];
  let published = 0;
  bus.subscribe('billing', Placed, () => {
    published++;
  });
  const stop = stamps.onStamp({
    // Slow on purpose: a publish to the stamp must wait for it.
    opened: async (tenant, backbone) => {
      await new Promise((resolve) => setTimeout(resolve, 20));
      heard.push(`opened ${tenant} ${backbone.name} (${published} handled)`);
    },
    removed: (tenant) => {
      heard.push(`removed ${tenant}`);
    },
  });
  await bus.start();
  assert.deepEqual(heard, ['opened acme memory (0 handled)'], 'a stamp that cannot open is not heard of');
  await stamps.addTenant('initech');
  assert.equal(heard.at(-1), 'opened initech memory (0 handled)', 'addTenant resolves once the listeners have run');
  down.delete('globex');
  await waitFor('globex back', () => heard.includes('opened globex memory (0 handled)'));
  await bus.publish(Placed, { key: 'k', seq: 1 }, { tenant: 'globex' });

  // A listener added later hears of the stamps open now; one that throws is a warning, not a failure.
  const late: string[] = [];
  stamps.onStamp({
    opened: (tenant) => {
      late.push(tenant);
      throw new Error('listener broke');
    },
  });
  assert.deepEqual(late.sort(), ['acme', 'globex', 'initech']);
  await waitFor('the warnings', () => warnings.filter((w) => w.includes('listener failed')).length === 3);
  assert.match(warnings.find((w) => w.includes('listener failed')) ?? '', /a listener failed on tenant \w+'s stamp being opened \(listener broke\)/);

  await stamps.removeTenant('initech');
  assert.equal(heard.at(-1), 'removed initech');
  stop();
  await stamps.addTenant('hooli');
  assert.ok(!heard.some((h) => h.includes('hooli')), 'a listener that stopped hears nothing more');
});
