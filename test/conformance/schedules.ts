/**
 * Recurring schedules on every backbone that can record ticks (PostgreSQL, memory, brokers with an outbox):
 * one publish per tick across processes, a missed tick fired once on start (or skipped), bad definitions
 * refused by name. Part of the conformance suite.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TidingsError, ValidationError, type Bus } from '../../src/index.ts';
import { Ticked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';
import type { ConformanceTarget } from './suite.ts';

/** A schedule that fires every second, its message's seq the tick's second. */
function everySecond<Tx>(bus: Bus<Tx>, name: string, missed?: 'one' | 'none'): void {
  bus.schedule(name, '* * * * * *', Ticked, (tick) => ({ key: name, seq: tick.getTime() / 1_000 }), missed === undefined ? {} : { missed });
}

export function recurringSchedules<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test('a schedule every second declared by three processes publishes each tick once, with no gap', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const consumer = kit.newBus(namespace);
    const ticks: number[] = [];
    consumer.subscribe('ticks', Ticked, (message) => {
      ticks.push(message.data.seq);
    });
    await consumer.start();
    const processes = [kit.newBus(namespace), kit.newBus(namespace), kit.newBus(namespace)];
    for (const bus of processes) everySecond(bus, 'heartbeat');
    if (!target.offers.transactions) {
      await assert.rejects(processes[0]!.start(), (error: unknown) => error instanceof TidingsError && /outbox/.test(error.message));
      return;
    }
    await Promise.all(processes.map((bus) => bus.start()));
    await waitFor('four ticks', () => ticks.length >= 4, 20_000);
    await Promise.all(processes.map((bus) => kit.stop(bus)));
    await sleep(500);
    const sorted = [...ticks].sort((a, b) => a - b);
    assert.equal(new Set(ticks).size, ticks.length, `each tick once: ${ticks.join(' ')}`);
    assert.deepEqual(
      sorted,
      Array.from({ length: sorted.length }, (_, i) => sorted[0]! + i),
      'no tick missed',
    );
  });

  test('a tick missed while no process ran fires once on start; with missed: none it is skipped', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    if (!target.offers.transactions) return t.skip(`${target.name} alone cannot record ticks`);
    const consumer = kit.newBus(namespace);
    const ticks = new Map<string, number[]>();
    consumer.subscribe('ticks', Ticked, (message) => {
      ticks.set(message.data.key, [...(ticks.get(message.data.key) ?? []), message.data.seq]);
    });
    await consumer.start();
    for (const missed of ['one', 'none'] as const) {
      const name = `catch-up-${missed}`;
      const first = kit.newBus(namespace);
      everySecond(first, name, missed);
      await first.start();
      await waitFor(`${name}: a first tick`, () => (ticks.get(name)?.length ?? 0) >= 1, 20_000);
      await kit.stop(first);
      const stoppedAt = Date.now();
      await sleep(2_600); // at least two ticks pass with nothing running
      const second = kit.newBus(namespace);
      everySecond(second, name, missed);
      await second.start();
      const restartedAt = Date.now();
      await waitFor(`${name}: a tick after the restart`, () => (ticks.get(name) ?? []).some((seq) => seq * 1_000 > restartedAt), 20_000);
      await kit.stop(second);
      await sleep(300);
      const seen = ticks.get(name)!;
      const gap = seen.filter((seq) => seq * 1_000 > stoppedAt && seq * 1_000 <= restartedAt);
      assert.equal(new Set(seen).size, seen.length, `${name}: each tick once`);
      if (missed === 'one') assert.equal(gap.length, 1, `${name}: the latest missed tick, once (ticks ${seen.join(' ')})`);
      else assert.equal(gap.length, 0, `${name}: missed ticks skipped (ticks ${seen.join(' ')})`);
    }
  });

  test('bad schedules are refused by name: a cron pattern, a time zone, a name declared twice, data that breaks the contract', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const refused = (fn: () => unknown, code: string, pattern: RegExp) =>
      assert.throws(fn, (error: unknown) => {
        assert.ok(error instanceof TidingsError, String(error));
        assert.equal(error.code, code);
        assert.match(error.message, pattern);
        return true;
      });
    refused(
      () => bus.schedule('bad-cron', '61 * * * *', Ticked, { key: 'k', seq: 1 }),
      'INVALID_OPTIONS',
      /schedule bad-cron: cron pattern "61 \* \* \* \*" is invalid/,
    );
    refused(
      () => bus.schedule('bad-zone', '* * * * *', Ticked, { key: 'k', seq: 1 }, { timezone: 'Mars/Olympus' }),
      'INVALID_OPTIONS',
      /time zone "Mars\/Olympus"/,
    );
    refused(() => bus.schedule('Bad Name', '* * * * *', Ticked, { key: 'k', seq: 1 }), 'INVALID_CONTRACT', /Schedule name "Bad Name" is invalid/);
    assert.throws(
      () => bus.schedule('bad-data', '* * * * *', Ticked, { key: 'k', seq: 'one' } as never),
      (error: unknown) => error instanceof ValidationError && /seq/.test(error.message),
    );
    bus.schedule('twice', '* * * * *', Ticked, { key: 'k', seq: 1 });
    refused(() => bus.schedule('twice', '*/5 * * * *', Ticked, { key: 'k', seq: 1 }), 'SUBSCRIPTION_CONFLICT', /Schedule twice is already declared/);
  });
}
