/**
 * Commands on every backbone: one subscription owns a command and `send` delivers each once there; a second
 * subscription of the same command is refused naming both, also when several start at the same moment, while
 * events still fan out. Part of the suite.
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

    // The owner is recorded, not only known while it runs: with every worker of billing stopped, fraud is still refused.
    await kit.stop(billing);
    const later = kit.newBus(namespace);
    later.subscribe('fraud', Charge, () => undefined);
    await assert.rejects(
      later.start(),
      (error: unknown) => error instanceof TidingsError && error.code === 'SUBSCRIPTION_CONFLICT' && /subscription billing/.test(error.message),
    );
  });

  test('two services start a subscription of one command at the same moment: exactly one owns it, the other is refused naming both', async (t) => {
    if (target.offers.commandOwners !== true) return t.skip(`${target.name} does not refuse a second owner of a command yet`);
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const names = ['ledger', 'payments', 'invoices', 'refunds'];
    const handled = new Map<string, number[]>(names.map((name) => [name, []]));
    const buses = names.map((name) => {
      const bus = kit.newBus(namespace);
      bus.subscribe(name, Charge, (message) => {
        handled.get(name)!.push(message.data.seq);
      });
      return bus;
    });
    const starts = await Promise.allSettled(buses.map((bus) => bus.start()));
    const owners = names.filter((_, i) => starts[i]!.status === 'fulfilled');
    assert.equal(owners.length, 1, `one owner (started: ${owners.join(', ')})`);
    const [owner] = owners;
    for (const [i, start] of starts.entries()) {
      if (start.status === 'fulfilled') continue;
      const error: unknown = start.reason;
      assert.ok(error instanceof TidingsError && error.code === 'SUBSCRIPTION_CONFLICT', String(error));
      assert.match(error.message, new RegExp(`Command test\\.charge is handled by subscription ${owner} already; subscription ${names[i]} cannot take it too`));
    }
    // The owner's own later workers (a restart, a second process) start and share its commands.
    const again = kit.newBus(namespace);
    again.subscribe(owner!, Charge, (message) => {
      handled.get(owner!)!.push(message.data.seq);
    });
    await again.start();
    for (let seq = 1; seq <= 10; seq++) await again.send(Charge, { key: `k${seq}`, seq });
    await waitFor('ten charges', () => handled.get(owner!)!.length >= 10, 20_000);
    await sleep(300);
    assert.deepEqual(
      [...handled.get(owner!)!].sort((a, b) => a - b),
      Array.from({ length: 10 }, (_, i) => i + 1),
      'each command once, by its owner',
    );
    for (const name of names) if (name !== owner) assert.deepEqual(handled.get(name), [], `${name} got nothing`);
  });
}
