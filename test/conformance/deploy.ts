/**
 * A rolling deploy on every backbone: the workers of one subscription disagree on its topics while the old
 * version's processes still run beside the new one's. A worker must never acknowledge, dead-letter or skip a
 * message of a topic the subscription has and it cannot handle: the messages wait for a worker that can.
 * Part of the conformance suite (suite.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Bus, Message } from '../../src/index.ts';
import { Ticked, Tocked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { SuiteKit } from './hostile.ts';

type Tick = Message<{ key: string; seq: number }>;

/** Who handled what: `E:12 -> [old]`. */
class Ledger {
  readonly by = new Map<string, string[]>();
  handler(worker: string) {
    return (message: Tick) => {
      const id = `${message.topic === Tocked.topic ? 'F' : 'E'}:${message.data.seq}`;
      this.by.set(id, [...(this.by.get(id) ?? []), worker]);
    };
  }
  /** Messages of one topic handled, of those numbered `from` or later. */
  count(prefix: 'E' | 'F', from = 0): number {
    return [...this.by.keys()].filter((id) => id.startsWith(prefix) && Number(id.slice(2)) >= from).length;
  }
}

/** E and F messages over 8 keys, alternating; `spreadMs` apart in rounds of 10, so workers come and go meanwhile. */
async function publishBoth<Tx>(bus: Bus<Tx>, from: number, count: number, spreadMs = 0): Promise<void> {
  for (let seq = from; seq < from + count; seq++) {
    await bus.publish(seq % 2 === 0 ? Ticked : Tocked, { key: `k${seq % 8}`, seq });
    if (spreadMs > 0 && (seq - from) % 10 === 9) await sleep(spreadMs);
  }
}

export function rollingDeploy<Tx>(kit: SuiteKit<Tx>): void {
  test('rolling deploy that adds a handler: old workers (E) beside new ones (E and F); every F handled once, by a new worker, nothing dead-lettered', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const ledger = new Ledger();
    const old = kit.newBus(namespace);
    old.subscription('deployed', { partitions: 4 }).on(Ticked, ledger.handler('old'));
    await old.start();
    await publishBoth(old, 0, 20); // before the new version: its F messages are no subscription's yet
    await waitFor('the old version handling its E messages', () => ledger.count('E') >= 10, 20_000);
    ledger.by.clear();

    const neu = kit.newBus(namespace);
    neu.subscription('deployed', { partitions: 4 }).on(Ticked, ledger.handler('new')).on(Tocked, ledger.handler('new'));
    await neu.start();
    await publishBoth(neu, 100, 80, 250); // during the deploy, from both versions
    await publishBoth(old, 200, 20);
    await waitFor('every message of the deploy', () => ledger.count('E', 100) >= 50 && ledger.count('F', 100) >= 50, 30_000);
    await kit.stop(old);
    await publishBoth(neu, 300, 20); // after it
    await waitFor('every message after the deploy', () => ledger.count('E', 100) >= 60 && ledger.count('F', 100) >= 60, 30_000);
    await sleep(300);

    // An F published before the new version started may reach it too (if no cursor had passed it yet): not counted.
    const fs = [...ledger.by].filter(([id]) => id.startsWith('F') && Number(id.slice(2)) >= 100);
    assert.equal(fs.length, 60, 'every F message of the deploy and after it');
    assert.deepEqual(
      fs.filter(([, workers]) => workers.length !== 1 || workers[0] !== 'new'),
      [],
      'each handled once, by a worker that has its handler',
    );
    assert.equal(ledger.count('E', 100), 60, 'every E message (at least once)');
    assert.equal(await neu.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
  });

  test('rolling deploy that removes a handler: old workers (E and F) beside new ones (E); F handled by old workers while they run, nothing dead-lettered', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const ledger = new Ledger();
    const old = kit.newBus(namespace);
    old.subscription('deployed', { partitions: 4 }).on(Ticked, ledger.handler('old')).on(Tocked, ledger.handler('old'));
    await old.start();
    const neu = kit.newBus(namespace);
    neu.subscription('deployed', { partitions: 4 }).on(Ticked, ledger.handler('new'));
    await neu.start();
    await publishBoth(neu, 0, 60, 250);
    await publishBoth(old, 100, 20, 250);
    await waitFor('every message of the deploy', () => ledger.count('E') >= 40 && ledger.count('F') >= 40, 30_000);
    const fs = [...ledger.by].filter(([id]) => id.startsWith('F'));
    assert.deepEqual(
      fs.filter(([, workers]) => workers.length !== 1 || workers[0] !== 'old'),
      [],
      'each F handled once, by an old worker',
    );

    await kit.stop(old);
    ledger.by.clear();
    await publishBoth(neu, 200, 20); // once no worker handles F, F is no longer the subscription's
    await waitFor('the E messages after the deploy', () => ledger.count('E') >= 10, 30_000);
    await sleep(300);
    assert.equal(ledger.count('F'), 0);
    assert.equal(ledger.count('E'), 10);
    assert.equal(await neu.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
  });
}
