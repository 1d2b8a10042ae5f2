/**
 * Scheduled delivery on every backbone that can hold a message until it is due (PostgreSQL, memory, and
 * the brokers through their outbox): never early, once, in its key's order at its due time, cancellable
 * until then, atomic with a transaction, and bad times refused by name. Part of the conformance suite.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TidingsError } from '../../src/index.ts';
import { Ticked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';
import type { ConformanceTarget } from './suite.ts';

export function scheduledDelivery<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test("scheduled delivery: never early, once, in its key's order at its due time; cancellable until then; atomic with a transaction", async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const handled: Array<{ seq: number; at: number }> = [];
    bus.subscribe('later', Ticked, (message) => {
      handled.push({ seq: message.data.seq, at: Date.now() });
    });
    await bus.start();
    if (!target.offers.transactions) {
      // A broker alone cannot hold a message until it is due: refused, naming what it needs.
      await assert.rejects(
        bus.publish(Ticked, { key: 'k', seq: 1 }, { delayMs: 100 }),
        (error: unknown) => error instanceof TidingsError && /outbox/.test(error.message),
      );
      return;
    }
    const start = Date.now();
    const a = await bus.publish(Ticked, { key: 'k', seq: 1 }, { delayMs: 600 });
    assert.ok(a.deliverAt instanceof Date && a.deliverAt.getTime() >= start + 600, 'the handle says when it is due');
    await bus.publish(Ticked, { key: 'k', seq: 2 }); // now: goes ahead of seq 1, which enters the key's order when due
    await bus.publish(Ticked, { key: 'past', seq: 3 }, { deliverAt: new Date(start - 60_000) }); // a time past: now
    const cancelled = await bus.publish(Ticked, { key: 'c', seq: 4 }, { deliverAt: new Date(start + 800).toISOString() });
    await bus.publishMany(
      Ticked,
      [
        { key: 'm', seq: 5 },
        { key: 'm', seq: 6 },
      ],
      { deliverAt: start + 700 },
    );
    await assert.rejects(
      bus.transaction(async (tx) => {
        await bus.publish(Ticked, { key: 'r', seq: 7 }, { tx, delayMs: 100 });
        throw new Error('rolled back');
      }),
      /rolled back/,
    );
    await bus.transaction(async (tx) => {
      await bus.publish(Ticked, { key: 'r', seq: 8 }, { tx, delayMs: 100 });
    });
    // The same id scheduled twice (a publish retried) is one message.
    const twice = await bus.publish(Ticked, { key: 'd', seq: 9 }, { delayMs: 200 });
    await bus.publish(Ticked, { key: 'd', seq: 9 }, { delayMs: 200, id: twice.id });
    assert.equal(await bus.cancelScheduled(cancelled.id), true, 'cancelled before it was due');
    assert.equal(await bus.cancelScheduled(cancelled.id), false, 'a second cancel finds nothing');

    await waitFor('every scheduled message', () => [1, 5, 6, 8, 9].every((seq) => handled.some((entry) => entry.seq === seq)), 20_000);
    await sleep(1_000);
    const at = (seq: number) => handled.find((entry) => entry.seq === seq)!.at;
    assert.deepEqual(
      handled.map((entry) => entry.seq).sort((x, y) => x - y),
      [1, 2, 3, 5, 6, 8, 9],
      'each once; the cancelled and the rolled-back never',
    );
    assert.ok(at(1) >= start + 600, `never early (seq 1 at +${at(1) - start} ms)`);
    assert.ok(at(5) >= start + 700 && at(6) >= start + 700, 'publishMany: never early');
    assert.ok(at(2) < at(1), "a message due later enters its key's order when due: the one published after it, due now, goes first");
    assert.ok(at(3) < start + 600, 'a time in the past is delivered now');
    assert.equal(await bus.cancelScheduled(a.id), false, 'delivered: nothing to cancel');
    t.diagnostic(`lateness: ${[1, 5, 6].map((seq) => at(seq) - (seq === 1 ? start + 600 : start + 700)).join(', ')} ms`);
  });

  test('scheduled delivery: bad times are refused by name, nothing written', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    await bus.start();
    const cases: Array<[unknown, RegExp]> = [
      [{ deliverAt: 'next tuesday' }, /deliverAt must be a Date, an ISO 8601 string or epoch milliseconds, got "next tuesday"/],
      [{ deliverAt: new Date(Number.NaN) }, /deliverAt must be/],
      [{ delayMs: -5 }, /delayMs must be a number of milliseconds >= 0, got -5/],
      [{ delayMs: Number.POSITIVE_INFINITY }, /delayMs must be/],
      [{ delayMs: 10, deliverAt: Date.now() + 10 }, /deliverAt or delayMs, not both/],
    ];
    for (const [options, pattern] of cases) {
      await assert.rejects(bus.publish(Ticked, { key: 'k', seq: 1 }, options as never), (error: unknown) => {
        assert.ok(error instanceof TidingsError && error.code === 'INVALID_OPTIONS', String(error));
        assert.match(error.message, pattern);
        assert.match(error.message, /test\.ticked/);
        return true;
      });
    }
  });
}
