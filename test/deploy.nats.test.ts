/**
 * A rolling deploy on NATS (issue 18, defect 0): an old and a new worker of one subscription run side by side
 * and handle different topics. Every message of a topic some live worker handles is handled once, by a worker
 * that has its handler, in per-key order; nothing is dead-lettered, nothing acknowledged unseen. Each bus has
 * its own connection and worker id, as a process of its own would.
 */
import assert from 'node:assert/strict';
import { describe, test, type TestContext } from 'node:test';
import type { Bus } from '../src/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { Ticked, Tocked } from './fixtures/contracts.ts';
import { sleep, waitFor } from './helpers.ts';
import { natsWorld, quickNats, type NatsWorld } from './fixtures/nats.ts';

interface Handled {
  readonly worker: string;
  readonly topic: string;
  readonly key: string;
  readonly seq: number;
}

/** A namespace of its own for `t` with a publisher started, and the log its workers will write. */
async function deployment(t: TestContext): Promise<{ ns: NatsWorld; publisher: Bus<PgTransaction>; log: Handled[] } | undefined> {
  const ns = await natsWorld(t, 'd');
  if (ns === undefined) return undefined;
  const publisher = ns.bus('publisher');
  await publisher.start();
  return { ns, publisher, log: [] };
}

/** A worker of subscription `billing`, with handlers for `topics`; what it handles goes to `log`, in order. */
async function worker(
  ns: NatsWorld,
  name: string,
  topics: ReadonlyArray<'ticked' | 'tocked'>,
  log: Handled[],
  warnings: string[],
): Promise<Bus<PgTransaction>> {
  const bus = ns.bus(name, { onWarning: (message) => warnings.push(message) });
  const record = (topic: string) => (message: { data: { key: string; seq: number } }) => {
    log.push({ worker: name, topic, key: message.data.key, seq: message.data.seq });
  };
  const sub = bus.subscription('billing', { concurrency: 8 });
  if (topics.includes('ticked')) sub.on(Ticked, record(Ticked.topic));
  if (topics.includes('tocked')) sub.on(Tocked, record(Tocked.topic));
  await bus.start();
  return bus;
}

/** Per key, seq 0..perKey-1 alternating between the two topics: even Ticked, odd Tocked. */
async function publishRound(publisher: Bus<PgTransaction>, keys: number, perKey: number, first = 0): Promise<void> {
  for (let seq = first; seq < first + perKey; seq++) {
    const data = Array.from({ length: keys }, (_, k) => ({ key: `key-${k}`, seq }));
    if (seq % 2 === 0) await publisher.publishMany(Ticked, data);
    else await publisher.publishMany(Tocked, data);
  }
}

/** Seqs 0..n-1. */
const upTo = (n: number) => Array.from({ length: n }, (_, i) => i);

/**
 * Waits until `log` holds `keys` × `seqs` handlings (and half a second more, for a duplicate to show), then
 * checks that each key had each of `seqs` once, in order.
 */
async function handledOncePerKeyInOrder(what: string, log: readonly Handled[], keys: number, seqs: readonly number[]): Promise<void> {
  await waitFor(what, () => log.length >= keys * seqs.length, 30_000);
  await sleep(500);
  for (let k = 0; k < keys; k++) {
    const handled = log.filter((h) => h.key === `key-${k}`).map((h) => h.seq);
    assert.deepEqual(handled, seqs, `key-${k}: each message once, in order`);
  }
}

describe('nats rolling deploy', () => {
  test("adding a topic: the old worker leaves the new topic's messages, and the buckets, to the new one", async (t) => {
    const deployed = await deployment(t);
    if (deployed === undefined) return;
    const { ns, publisher, log } = deployed;
    const oldWarnings: string[] = [];
    await worker(ns, 'old', ['ticked'], log, oldWarnings);
    await publisher.publishMany(Ticked, [
      { key: 'key-0', seq: -2 },
      { key: 'key-1', seq: -2 },
    ]);
    await waitFor('the old worker runs', () => log.length === 2);
    log.length = 0;

    const newWarnings: string[] = [];
    await worker(ns, 'new', ['ticked', 'tocked'], log, newWarnings);
    const keys = 20;
    const perKey = 10;
    await publishRound(publisher, keys, perKey);
    await handledOncePerKeyInOrder('every message', log, keys, upTo(perKey));
    assert.ok(
      log.filter((h) => h.topic === Tocked.topic).every((h) => h.worker === 'new'),
      'the new topic only by the new worker',
    );
    assert.equal(await publisher.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
    assert.ok(
      oldWarnings.some((w) =>
        /^Subscription billing: its live workers handle different topics \(.+ handles test\.ticked; .+ handles test\.ticked, test\.tocked|^Subscription billing: its live workers handle different topics \(.+ handles test\.ticked, test\.tocked; .+ handles test\.ticked;/.test(
          w,
        ),
      ),
      `a warning names the subscription, the workers and their topics: ${oldWarnings.join(' | ')}`,
    );
  });

  test("adding a topic, then the only new worker stops: the old one holds the new topic's messages, skipping nothing, until a new worker is back", async (t) => {
    const deployed = await deployment(t);
    if (deployed === undefined) return;
    const { ns, publisher, log } = deployed;
    const oldWarnings: string[] = [];
    await worker(ns, 'old', ['ticked'], log, oldWarnings);
    const first = await worker(ns, 'new', ['ticked', 'tocked'], log, []);
    const keys = 8;
    await publishRound(publisher, keys, 4);
    await waitFor('the first round', () => log.length >= keys * 4, 30_000);
    await first.stop();

    // Only the old worker runs: the new topic is still the subscription's (its newest worker had it).
    await publishRound(publisher, keys, 4, 4);
    await waitFor(
      'the old worker warns that the new topic waits',
      () => oldWarnings.some((w) => /topic test\.tocked is its newest worker's .* but no live worker handles it/.test(w)),
      15_000,
    );
    await waitFor('the first message of each key in this round', () => log.filter((h) => h.seq === 4).length >= keys, 15_000);
    await sleep(4 * quickNats.heartbeatMs);
    assert.deepEqual(
      log.filter((h) => h.seq >= 5),
      [],
      'the keys wait at their Tocked message: nothing after it, nothing skipped',
    );

    await worker(ns, 'back', ['ticked', 'tocked'], log, []);
    await handledOncePerKeyInOrder('every message', log, keys, upTo(8));
    assert.ok(
      log.filter((h) => h.topic === Tocked.topic).every((h) => h.worker !== 'old'),
      'the new topic never by the old worker',
    );
    assert.equal(await publisher.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
  });

  test('removing a topic: the new worker takes no bucket while the old one, which still handles it, lives', async (t) => {
    const deployed = await deployment(t);
    if (deployed === undefined) return;
    const { ns, publisher, log } = deployed;
    const warnings: string[] = [];
    const old = await worker(ns, 'old', ['ticked', 'tocked'], log, warnings);
    const newWarnings: string[] = [];
    await worker(ns, 'new', ['ticked'], log, newWarnings);
    await waitFor('the new worker sees the old one', () => newWarnings.some((w) => /handle different topics/.test(w)));
    // A few heartbeats: time enough for the new worker to take a share of the buckets, were it to.
    await sleep(4 * quickNats.heartbeatMs);
    const keys = 20;
    const perKey = 10;
    await publishRound(publisher, keys, perKey);
    await handledOncePerKeyInOrder('every message', log, keys, upTo(perKey));
    assert.ok(
      log.every((h) => h.worker === 'old'),
      'the old worker, which handles every topic, holds every bucket',
    );
    assert.ok(
      warnings.some((w) => /handle different topics/.test(w)),
      'the disagreement is warned about',
    );

    // The old worker goes: the removed topic is no longer the subscription's; the rest flows to the new one.
    await old.stop();
    log.length = 0;
    await publishRound(publisher, keys, 4, perKey);
    await handledOncePerKeyInOrder('the next round of the remaining topic', log, keys, [perKey, perKey + 2]);
    assert.ok(log.every((h) => h.worker === 'new' && h.topic === Ticked.topic));
    assert.equal(await publisher.backbone.deadLetters().count({ all: true }), 0, 'nothing dead-lettered');
  });
});
