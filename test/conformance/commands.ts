/**
 * Commands on every backbone: one subscription owns a command and `send` delivers each once there; a second
 * subscription of the same command is refused naming both, while events still fan out. Part of the suite.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TidingsError } from '../../src/index.ts';
import { Charge, Ticked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';
import type { ConformanceTarget } from './suite.ts';

export function commandOwners<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test('a command has one owner: send delivers it once there; a second subscription of it is refused naming both, events still fan out', async (t) => {
    if (target.offers.commandOwners !== true)
      return t.skip(`${target.name} does not refuse a second owner of a command yet (issue 21: brokers keep no registry of subscriptions)`);
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const billing = kit.newBus(namespace);
    const charged: number[] = [];
    const events = new Map<string, number>();
    billing.subscribe('billing', Charge, (message) => {
      charged.push(message.data.seq);
    });
    billing.subscribe('billing-audit', Ticked, (message) => {
      events.set(`a${message.data.seq}`, 1);
    });
    await billing.start();
    const other = kit.newBus(namespace);
    other.subscribe('fraud', Charge, () => undefined);
    await assert.rejects(other.start(), (error: unknown) => {
      assert.ok(error instanceof TidingsError && error.code === 'SUBSCRIPTION_CONFLICT', String(error));
      assert.match(error.message, /Command test\.charge is handled by subscription billing already; subscription fraud cannot take it too/);
      return true;
    });
    const listener = kit.newBus(namespace);
    listener.subscribe('shipping-audit', Ticked, (message) => {
      events.set(`s${message.data.seq}`, 1);
    });
    await listener.start();
    for (let seq = 1; seq <= 5; seq++) await billing.send(Charge, { key: `c${seq % 2}`, seq });
    await billing.publish(Ticked, { key: 'e', seq: 1 });
    await waitFor('five charges and the event in both subscriptions', () => charged.length >= 5 && events.size >= 2, 20_000);
    await sleep(300);
    assert.deepEqual([...charged].sort(), [1, 2, 3, 4, 5], 'each command once, by its owner');
    assert.deepEqual([...events.keys()].sort(), ['a1', 's1'], 'an event reaches every subscription');
  });
}
