/**
 * Sagas on every backbone that keeps their state (PostgreSQL, memory, brokers with an outbox): transitions
 * once each, durable timeouts that fire unless the saga completed first, compensation published in the
 * transition, concurrent messages for one instance never losing an update. Part of the conformance suite.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { defineSaga, TidingsError } from '../../src/index.ts';
import { SagaBumped, SagaCancelled, SagaDeclined, SagaOrdered, SagaPaid } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';
import type { ConformanceTarget } from './suite.ts';

const Payment = defineSaga({
  name: 'test.payment',
  state: z.object({ orderId: z.string(), status: z.enum(['awaiting', 'paid', 'declined', 'timed-out']), bumps: z.number().int() }),
  messages: { ordered: SagaOrdered, paid: SagaPaid, declined: SagaDeclined, bumped: SagaBumped },
  correlate: { ordered: (d) => d.orderId, paid: (d) => d.orderId, declined: (d) => d.orderId, bumped: (d) => d.orderId },
  start: {
    ordered: async (message, ctx) => {
      await ctx.requestTimeout('payment', 2_000);
      return { orderId: message.data.orderId, status: 'awaiting' as const, bumps: 0 };
    },
  },
  handle: {
    paid: (state, _message, ctx) => {
      ctx.complete();
      return { ...state, status: 'paid' as const };
    },
    declined: async (state, _message, ctx) => {
      await ctx.publish(SagaCancelled, { orderId: state.orderId, reason: 'declined' });
      ctx.complete();
      return { ...state, status: 'declined' as const };
    },
    bumped: (state) => ({ ...state, bumps: state.bumps + 1 }),
  },
  timeouts: {
    payment: async (state, _data, ctx) => {
      await ctx.publish(SagaCancelled, { orderId: state.orderId, reason: 'payment timed out' });
      ctx.complete();
      return { ...state, status: 'timed-out' as const };
    },
  },
  early: 'dead-letter',
});

export function sagas<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test('a saga: 30 orders paid, declined or timed out; each compensated once; a timeout after completion ignored; concurrent messages for one instance lose no update', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    if (!target.offers.transactions) {
      assert.throws(
        () => bus.saga(Payment),
        (error: unknown) => error instanceof TidingsError && /outbox/.test(error.message),
      );
      return;
    }
    bus.saga(Payment, { concurrency: 16 });
    const cancelled: string[] = [];
    bus.subscribe('compensation', SagaCancelled, (message) => {
      cancelled.push(`${message.data.orderId}:${message.data.reason}`);
    });
    await bus.start();
    for (let i = 0; i < 30; i++) await bus.publish(SagaOrdered, { orderId: `o${i}` });
    await waitFor('every saga started', () => bus.stats().sagas['test.payment']!.started >= 30, 20_000);
    for (let i = 0; i < 30; i++) {
      if (i % 3 === 0) await bus.publish(SagaPaid, { orderId: `o${i}` });
      if (i % 3 === 1) await bus.publish(SagaDeclined, { orderId: `o${i}` });
    }
    // Twenty bumps of one order, on twenty different keys: they run at once, and must all count.
    await bus.publishMany(
      SagaBumped,
      Array.from({ length: 20 }, (_, n) => ({ orderId: 'o2', n })),
    );
    await waitFor('every saga completed', () => bus.stats().sagas['test.payment']!.completed >= 30, 20_000);
    // The paid and declined orders' timeouts fire after their completion: ignored.
    await waitFor('every timeout', () => bus.stats().sagas['test.payment']!.ignoredAfterCompletion >= 20, 20_000);
    await sleep(300);
    // What committed, from the store (the process's counts are of transitions run: a batch rolled back runs again).
    const store = bus.backbone.sagas!();
    const instances = await Promise.all(Array.from({ length: 30 }, (_, i) => store.find('test.payment', `o${i}`)));
    assert.deepEqual(
      instances.map((row) => `${(row?.state as { status: string } | undefined)?.status}:${row?.completed}`),
      Array.from({ length: 30 }, (_, i) => `${['paid', 'declined', 'timed-out'][i % 3]}:true`),
      'each order in the state its messages lead to, completed',
    );
    const stats = bus.stats().sagas['test.payment']!;
    const expected = Array.from({ length: 30 }, (_, i) => i)
      .filter((i) => i % 3 !== 0)
      .map((i) => `o${i}:${i % 3 === 1 ? 'declined' : 'payment timed out'}`);
    assert.deepEqual([...cancelled].sort(), expected.sort(), 'declined and timed-out orders compensated, once each');
    // o2's bumps ran at once on twenty keys: each applied (or, after o2 timed out, ignored), none lost.
    const o2 = await bus.backbone.sagas!().find('test.payment', 'o2');
    const bumps = (o2!.state as { bumps: number }).bumps;
    assert.ok(bumps <= 20 && stats.ignoredAfterCompletion >= 20 + (20 - bumps), `bumps applied ${bumps}; the others ignored after completion`);
    assert.equal(o2!.version, 1 + bumps + 1, 'its start, each bump applied, its timeout: one version each, none lost');
    assert.ok(bumps > 0, 'the bumps came before the timeout');
  });

  test('a message for a saga that has not started goes to dead letters (early: dead-letter), naming the instance', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    if (!target.offers.transactions) return t.skip(`${target.name} alone keeps no saga state`);
    const bus = kit.newBus(namespace);
    bus.saga(Payment);
    await bus.start();
    await bus.publish(SagaPaid, { orderId: 'never-ordered' });
    const store = bus.backbone.deadLetters();
    await waitFor('the early message in dead letters', async () => (await store.count({ subscription: 'saga.test.payment' })) === 1, 20_000);
    const [letter] = (await store.list({ subscription: 'saga.test.payment' })).deadLetters;
    assert.match(letter!.reason, /instance never-ordered has not started/);
  });
}
