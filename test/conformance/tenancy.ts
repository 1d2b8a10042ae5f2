/**
 * Tenancy on every backbone (src/core/tenant.ts): the tenant travels from `withTenant` or `{ tenant }` into
 * the message, from a handled message into what its handler publishes (now, or later when the backbone
 * schedules), is required where a contract, bus or subscription says so, and hostile ids and cross-tenant
 * publishes are refused by name. Part of the conformance suite (suite.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { createBus, defineEvent, TidingsError, type Message } from '../../src/index.ts';
import { Ticked, Tocked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';
import type { ConformanceTarget } from './suite.ts';

/** A contract whose every message must belong to a tenant. */
const Invoiced = defineEvent('test.invoiced', { schema: z.object({ key: z.string() }), key: (data) => data.key, requireTenant: true });

const isCode = (code: string) => (error: unknown) => error instanceof TidingsError && error.code === code;

export function tenancy<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test('tenancy: the tenant travels from withTenant and { tenant } into handlers and what they publish, now and scheduled', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const ticks: Array<Message<{ key: string; seq: number }>> = [];
    const tocks: Array<{ seq: number; tenant: string | undefined; note: string | undefined }> = [];
    bus.subscribe('tenant-ticks', Ticked, async (message, ctx) => {
      ticks.push(message);
      // Both ways a handler publishes inherit the tenant; the scheduled one too, where the backbone schedules.
      await ctx.publish(Tocked, { key: message.key, seq: message.data.seq, note: 'ctx' });
      await bus.publish(Tocked, { key: message.key, seq: message.data.seq, note: 'bus' });
      if (target.offers.transactions) await ctx.publish(Tocked, { key: message.key, seq: message.data.seq, note: 'later' }, { delayMs: 50 });
    });
    bus.subscribe('tenant-tocks', Tocked, (message) => {
      tocks.push({ seq: message.data.seq, tenant: message.tenant, note: message.data.note });
    });
    await bus.start();
    await bus.withTenant('acme', async () => {
      await bus.publish(Ticked, { key: 'a', seq: 1 });
      await bus.publish(Ticked, { key: 'g', seq: 2 }, { tenant: 'globex' }); // a named tenant wins
    });
    await bus.publish(Ticked, { key: 'n', seq: 3 }); // no tenant
    const perTick = target.offers.transactions ? 3 : 2;
    await waitFor('every tock', () => tocks.length >= 3 * perTick);
    await sleep(100);
    assert.deepEqual(ticks.map((message) => [message.data.seq, message.tenant]).sort(), [
      [1, 'acme'],
      [2, 'globex'],
      [3, undefined],
    ]);
    for (const tock of tocks) assert.equal(tock.tenant, { 1: 'acme', 2: 'globex', 3: undefined }[tock.seq], `tock ${tock.seq} (${tock.note})`);
    assert.equal(tocks.length, 3 * perTick, 'each published once');
  });

  test('tenancy: TENANT_REQUIRED by contract and by bus, INVALID_TENANT for hostile ids, nothing written', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const seen: Array<string | undefined> = [];
    bus.subscribe('tenant-required-contract', Invoiced, (message) => {
      seen.push(message.tenant);
    });
    await bus.start();
    await assert.rejects(
      bus.publish(Invoiced, { key: 'k' }),
      (error: unknown) => isCode('TENANT_REQUIRED')(error) && /test\.invoiced/.test((error as Error).message),
    );
    for (const hostile of ["acme'; drop table log; --", 'ac\0me', '', ' acme', 'a"b', 'a\\b', 'line\nbreak']) {
      await assert.rejects(bus.publish(Ticked, { key: 'h', seq: 0 }, { tenant: hostile }), isCode('INVALID_TENANT'), JSON.stringify(hostile));
      assert.throws(() => bus.withTenant(hostile, () => undefined), isCode('INVALID_TENANT'));
    }
    const huge = 'x'.repeat(10_240);
    await assert.rejects(
      bus.publish(Ticked, { key: 'h', seq: 0 }, { tenant: huge }),
      (error: unknown) => isCode('LIMIT_EXCEEDED')(error) && /tenant is 10240 bytes/.test(String(error)),
    );
    assert.throws(() => bus.withTenant(huge, () => undefined), isCode('LIMIT_EXCEEDED'));
    await bus.publish(Invoiced, { key: 'k' }, { tenant: 'acme' });
    await waitFor('the tenant one', () => seen.length >= 1);
    assert.deepEqual(seen, ['acme']);

    const strict = createBus<Tx>({ service: 'strict', backbone: namespace.backbone(), requireTenant: true });
    try {
      await assert.rejects(
        strict.publish(Ticked, { key: 'k', seq: 1 }),
        (error: unknown) => isCode('TENANT_REQUIRED')(error) && /the bus requires/.test((error as Error).message),
      );
      await strict.withTenant('acme', () => strict.publish(Ticked, { key: 'k', seq: 1 }));
    } finally {
      await strict.stop();
    }
  });

  test('tenancy: a handler publishing for another tenant is refused unless cross-tenant; a subscription requiring a tenant dead-letters a message without one', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const refused: string[] = [];
    const fannedOut: Array<string | undefined> = [];
    const required: number[] = [];
    bus.subscribe(
      'tenant-bound',
      Ticked,
      async (message) => {
        if (message.data.note !== 'leak') return;
        try {
          await bus.publish(Tocked, { key: 'x', seq: message.data.seq, note: 'leaked' }, { tenant: 'globex' });
        } catch (error) {
          if (isCode('TENANT_FORBIDDEN')(error)) refused.push('named');
        }
        try {
          await bus.withTenant('globex', () => bus.publish(Tocked, { key: 'x', seq: message.data.seq, note: 'leaked' }));
        } catch (error) {
          if (isCode('TENANT_FORBIDDEN')(error)) refused.push('scope');
        }
      },
      { partitions: 1 },
    );
    bus.subscribe(
      'tenant-fan-out',
      Ticked,
      async (message, ctx) => {
        if (message.data.note !== 'fan') return;
        for (const tenant of ['acme', 'globex']) await ctx.publish(Tocked, { key: tenant, seq: message.data.seq, note: 'fanned' }, { tenant });
      },
      { crossTenant: true, partitions: 1 },
    );
    bus.subscribe(
      'tenant-tocks-seen',
      Tocked,
      (message) => {
        fannedOut.push(`${message.data.note}:${message.tenant}`);
      },
      { partitions: 1 },
    );
    bus.subscribe(
      'tenant-only',
      Ticked,
      (message) => {
        required.push(message.data.seq);
      },
      { requireTenant: true, partitions: 1, retry: { immediate: 0, delayed: [], jitter: 0 } },
    );
    await bus.start();
    await bus.publish(Ticked, { key: 'l', seq: 1, note: 'leak' }, { tenant: 'acme' });
    await bus.publish(Ticked, { key: 'f', seq: 2, note: 'fan' }, { tenant: 'acme' });
    await bus.publish(Ticked, { key: 'none', seq: 3 });
    await bus.publish(Ticked, { key: 'none', seq: 4 }, { tenant: 'acme' });
    const store = bus.backbone.deadLetters();
    await waitFor('the fan-out and the dead letter', async () => fannedOut.length >= 2 && (await store.count({ subscription: 'tenant-only' })) === 1);
    await waitFor('both refusals', () => refused.length >= 2);
    await sleep(200);
    assert.deepEqual(refused, ['named', 'scope'], 'a bound handler cannot publish for another tenant');
    assert.deepEqual(fannedOut.sort(), ['fanned:acme', 'fanned:globex'], 'a cross-tenant one can; nothing leaked');
    assert.deepEqual(
      required.sort((a, b) => a - b),
      [1, 2, 4],
      'the message without a tenant was not handled, the next one of its key was',
    );
    const [letter] = (await store.list({ subscription: 'tenant-only' })).deadLetters;
    assert.match(letter!.reason, /requires a tenant/);
  });
}
