/**
 * The behaviour every backbone promises (src/core/backbone.ts), as one suite. Each backbone's test file
 * calls `conformance(target)` with a target that builds its backbones in a namespace of their own per test
 * (a schema, an exchange prefix, a stream) and says what the backbone offers. A backbone is done when this
 * suite is green on it against its real server.
 */
import assert from 'node:assert/strict';
import { after, describe, test, type TestContext } from 'node:test';
import {
  createBus,
  deadLetter,
  keyHash,
  newId,
  PermanentError,
  ValidationError,
  type Backbone,
  type Bus,
  type HandlerContext,
  type Message,
} from '../../src/index.ts';
import type { Envelope } from '../../src/core/envelope.ts';
import { foreignTick, Ticked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import { rollingDeploy } from './deploy.ts';
import { hostileInput } from './hostile.ts';
import { scheduledDelivery } from './scheduled.ts';
import { recurringSchedules } from './schedules.ts';
import { commandOwners } from './commands.ts';
import { requestReply } from './requests.ts';
import { sagas } from './sagas.ts';
import { upcasting } from './upcast.ts';
import { tenancy } from './tenancy.ts';

/** A handling's lasting effect, written through the handler's transaction: counted to prove "exactly once". */
export interface EffectStore<Tx> {
  write(tx: Tx, message: Message<{ key: string; seq: number }>): Promise<void>;
  /** Every effect committed so far, in commit order. */
  rows(): Promise<Array<{ messageId: string; key: string; seq: number }>>;
}

/** One test's world: backbones that share a namespace, and how to clean it up. */
export interface Namespace<Tx> {
  /** A new backbone instance on the namespace (a second process, as far as the backbone can tell). */
  backbone(): Backbone<Tx>;
  /** Present when handlers get a transaction (`ctx.tx`): writes through it are counted here. */
  effects?: EffectStore<Tx> | undefined;
  cleanup(): Promise<void>;
}

export interface ConformanceTarget<Tx> {
  readonly name: string;
  /** Undefined when the server is unreachable (the test was skipped, or failed under CI=true). */
  namespace(t: TestContext): Promise<Namespace<Tx> | undefined>;
  readonly offers: {
    /** `publish(..., { tx })` and `bus.transaction()`: the transactional outbox. */
    readonly transactions: boolean;
    /** Backbones of one namespace share state beyond one instance (a server): stop, then restart elsewhere. */
    readonly durable: boolean;
    /** A second worker of a subscription takes part of the work (not only over on failure). */
    readonly balances: boolean;
    /** Refuses a second subscription of a command (absent: not yet, and the case is skipped saying so). */
    readonly commandOwners?: boolean;
  };
  /** Writes a message behind Tidings' back whose data breaks the contract (a foreign or corrupt producer). */
  readonly injectInvalid?: (backbone: Backbone<Tx>, envelope: Envelope) => Promise<void>;
  /** Subscription options that keep tests quick on this backbone (short leases, small batches). */
  readonly subscribeOptions?: Record<string, unknown>;
}

export function conformance<Tx>(target: ConformanceTarget<Tx>): void {
  const buses: Bus<Tx>[] = [];
  const namespaces: Namespace<Tx>[] = [];
  after(async () => {
    await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
    for (const namespace of namespaces) await namespace.cleanup().catch(() => undefined);
  });

  /** The buses of each namespace: stopped when its test ends, so a file of tests never holds them all at once. */
  const busesOf = new Map<Namespace<Tx>, Bus<Tx>[]>();

  async function world(t: TestContext): Promise<Namespace<Tx> | undefined> {
    const namespace = await target.namespace(t);
    if (namespace === undefined) return undefined;
    namespaces.push(namespace);
    busesOf.set(namespace, []);
    t.after(async () => {
      const own = busesOf.get(namespace) ?? [];
      await Promise.all(own.map((bus) => stop(bus).catch(() => undefined)));
    });
    return namespace;
  }

  function newBus(namespace: Namespace<Tx>, service = 'conformance', stopGraceMs?: number): Bus<Tx> {
    const bus = createBus<Tx>({
      service,
      backbone: namespace.backbone(),
      subscriptionDefaults: target.subscribeOptions,
      ...(stopGraceMs !== undefined && { stopGraceMs }),
    });
    buses.push(bus);
    busesOf.get(namespace)?.push(bus);
    return bus;
  }

  async function stop(bus: Bus<Tx>): Promise<void> {
    if (buses.includes(bus)) buses.splice(buses.indexOf(bus), 1);
    for (const own of busesOf.values()) if (own.includes(bus)) own.splice(own.indexOf(bus), 1);
    await bus.stop();
  }

  const count = (seen: Map<string, number>) => ({
    duplicates: [...seen.values()].filter((n) => n > 1).length,
  });

  describe(`conformance: ${target.name}`, () => {
    test('atomic publish: a rolled-back transaction delivers nothing, a committed one always delivers', async (t) => {
      if (!target.offers.transactions) return t.skip(`${target.name} has no transactions`);
      const namespace = await world(t);
      if (namespace === undefined) return;
      const bus = newBus(namespace);
      const seen: string[] = [];
      bus.subscribe('atomic', Ticked, (message) => {
        seen.push(`${message.data.key}:${message.data.seq}`);
      });
      await bus.start();
      await assert.rejects(
        bus.transaction(async (tx) => {
          await bus.publish(Ticked, { key: 'rolled-back', seq: 1 }, { tx });
          throw new Error('business rule failed');
        }),
        /business rule failed/,
      );
      await bus.transaction(async (tx) => {
        await bus.publishMany(
          Ticked,
          [
            { key: 'committed', seq: 1 },
            { key: 'committed', seq: 2 },
          ],
          { tx },
        );
      });
      await bus.publish(Ticked, { key: 'committed', seq: 3 });
      await waitFor('the three committed messages', () => seen.length >= 3);
      await sleep(300); // a rolled-back message would have arrived by now
      assert.deepEqual(seen.sort(), ['committed:1', 'committed:2', 'committed:3']);
    });

    test('nothing lost or skipped: 8 concurrent publishers, 2,000 messages, consumer reading throughout', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const bus = newBus(namespace);
      const seen = new Map<string, number>();
      bus.subscribe('all-of-them', Ticked, (message) => {
        seen.set(message.id, (seen.get(message.id) ?? 0) + 1);
      });
      await bus.start();
      const published = new Set<string>();
      const perPublisher = 250;
      await Promise.all(
        Array.from({ length: 8 }, async (_, p) => {
          for (let i = 0; i < perPublisher; ) {
            const n = Math.min(1 + Math.floor(Math.random() * 10), perPublisher - i);
            const data = Array.from({ length: n }, (_, j) => ({ key: `p${p}`, seq: i + j }));
            const messages = target.offers.transactions
              ? await bus.transaction(async (tx) => {
                  const written = await bus.publishMany(Ticked, data, { tx });
                  // Transactions that took their place early often commit late.
                  await sleep(Math.random() * 10);
                  return written;
                })
              : await bus.publishMany(Ticked, data);
            for (const message of messages) published.add(message.id);
            i += n;
          }
        }),
      );
      assert.equal(published.size, 8 * perPublisher);
      await waitFor('every published message', () => [...published].every((id) => seen.has(id)), 30_000);
      assert.equal(count(seen).duplicates, 0, 'no message handled twice');
      assert.equal(seen.size, published.size);
    });

    test('per-key order with two workers of one subscription and 50 keys', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const publisher = newBus(namespace, 'publisher');
      await publisher.start();
      const byKey = new Map<string, number[]>();
      const byWorker = [0, 0];
      const workers = [0, 1].map((worker) => {
        const bus = newBus(namespace, `worker-${worker}`);
        bus.subscribe('ordered', Ticked, async (message) => {
          byWorker[worker]!++;
          const seqs = byKey.get(message.data.key) ?? [];
          seqs.push(message.data.seq);
          byKey.set(message.data.key, seqs);
          if (message.data.seq % 7 === 0) await sleep(1);
        });
        return bus;
      });
      await workers[0]!.start();
      const keys = 50;
      const perKey = 20;
      // Each key is published in order by one of 10 concurrent publishers; the second worker joins halfway
      // and has time to take its share of the partitions before the second half.
      const publish = (from: number, to: number) =>
        Promise.all(
          Array.from({ length: 10 }, async (_, p) => {
            for (let seq = from; seq < to; seq++) {
              for (let k = p; k < keys; k += 10) await publisher.publish(Ticked, { key: `key-${k}`, seq });
            }
          }),
        );
      await publish(0, perKey / 2);
      await workers[1]!.start();
      await sleep(1_500);
      await publish(perKey / 2, perKey);
      const total = keys * perKey;
      await waitFor('every message', () => byWorker[0]! + byWorker[1]! >= total, 60_000);
      await sleep(200);
      assert.equal(byWorker[0]! + byWorker[1]!, total, 'each message handled once');
      for (const [key, seqs] of byKey)
        assert.deepEqual(
          seqs,
          Array.from({ length: perKey }, (_, i) => i),
          `order of ${key}`,
        );
      if (target.offers.balances) assert.ok(byWorker[0]! > 0 && byWorker[1]! > 0, `both workers took part (${byWorker.join(' / ')})`);
    });

    test('different keys run concurrently, one key never', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const bus = newBus(namespace);
      let running = 0;
      let maxRunning = 0;
      let handled = 0;
      const runningKeys = new Set<string>();
      let overlap = false;
      bus.subscribe(
        'parallel',
        Ticked,
        async (message) => {
          if (runningKeys.has(message.data.key)) overlap = true;
          runningKeys.add(message.data.key);
          maxRunning = Math.max(maxRunning, ++running);
          await sleep(20);
          running--;
          runningKeys.delete(message.data.key);
          handled++;
        },
        { concurrency: 8, partitions: 1 },
      );
      await bus.start();
      await bus.publishMany(
        Ticked,
        Array.from({ length: 80 }, (_, i) => ({ key: `k${i % 8}`, seq: Math.floor(i / 8) })),
      );
      await waitFor('80 messages', () => handled === 80);
      assert.ok(maxRunning >= 4, `up to 8 keys in flight at once (saw ${maxRunning})`);
      assert.equal(overlap, false, 'never two messages of one key at once');
    });

    test('retries follow the schedule and hold only their key; dead letters keep every attempt; redrive delivers once', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const bus = newBus(namespace);
      const attempts = new Map<string, number[]>();
      const order: string[] = [];
      let failC1 = true;
      bus.subscribe(
        'flaky',
        Ticked,
        (message) => {
          const id = `${message.data.key}:${message.data.seq}`;
          attempts.set(id, [...(attempts.get(id) ?? []), Date.now()]);
          if (message.data.note === 'fail-twice' && attempts.get(id)!.length <= 2) throw new Error(`transient failure of ${id}`);
          if (message.data.note === 'always' && failC1) throw new Error(`${id} always fails`);
          if (message.data.note === 'permanent') throw new PermanentError('cannot ever work');
          if (message.data.note === 'give-up') return deadLetter('handler gave up');
          order.push(id);
          return undefined;
        },
        { retry: { immediate: 1, delayed: [300, 600], jitter: 0 }, partitions: 1 },
      );
      await bus.start();
      for (const data of [
        { key: 'a', seq: 1, note: 'fail-twice' },
        { key: 'a', seq: 2 },
        { key: 'b', seq: 1 },
        { key: 'c', seq: 1, note: 'always' },
        { key: 'c', seq: 2 },
        { key: 'd', seq: 1, note: 'permanent' },
        { key: 'd', seq: 2, note: 'give-up' },
        { key: 'd', seq: 3 },
      ]) {
        await bus.publish(Ticked, data);
      }
      await waitFor('a:2, c:2 and d:3 handled', () => ['a:2', 'c:2', 'd:3'].every((id) => order.includes(id)), 15_000);
      const a1 = attempts.get('a:1')!;
      assert.equal(a1.length, 3, 'a:1: the first attempt, one immediate retry, one delayed');
      assert.ok(a1[2]! - a1[1]! >= 280, `the delayed retry waited 300 ms (waited ${a1[2]! - a1[1]!})`);
      assert.ok(order.indexOf('a:1') < order.indexOf('a:2'), 'a:2 waited for a:1');
      assert.ok(order.indexOf('b:1') < order.indexOf('a:1'), 'key b did not wait for key a');
      assert.equal(attempts.get('c:1')!.length, 4, 'c:1 used every attempt');
      assert.ok(order.indexOf('c:2') >= 0 && !order.includes('c:1'), 'c:2 went on after c:1 was given up');
      assert.equal(attempts.get('d:1')!.length, 1, 'a permanent error is not retried');
      assert.equal(attempts.get('d:2')!.length, 1, 'a handler that gives up is not retried');

      const store = bus.backbone.deadLetters();
      await waitFor('three dead letters', async () => (await store.list({ subscription: 'flaky' })).total === 3);
      const { deadLetters } = await store.list({ subscription: 'flaky' });
      const byKey = new Map(deadLetters.map((letter) => [letter.key, letter]));
      assert.equal(byKey.get('c')!.attempts, 4);
      assert.match(byKey.get('c')!.reason, /failed 4 attempts/);
      assert.match(byKey.get('d')!.reason, /permanent error: cannot ever work|handler gave up/);
      const [c1] = await store.show(byKey.get('c')!.id);
      assert.ok(c1, 'show finds the dead letter by its id');
      assert.equal(c1.attempts.length, 4);
      assert.match(c1.attempts[3]!.error.message, /c:1 always fails/);
      assert.deepEqual(c1.envelope.data, { key: 'c', seq: 1, note: 'always' });

      failC1 = false;
      const redriven = await store.redrive({ ids: [byKey.get('c')!.id] });
      assert.equal(redriven.count, 1);
      await waitFor('the redriven c:1', () => order.includes('c:1'), 15_000);
      await sleep(300);
      assert.equal(order.filter((id) => id === 'c:1').length, 1, 'the redriven message was handled once');
      assert.equal((await store.list({ subscription: 'flaky' })).total, 2, 'the redriven dead letter is gone');
      const dropped = await store.drop({ subscription: 'flaky', all: true });
      assert.equal(dropped.count, 2);
      assert.equal(await store.count({ subscription: 'flaky' }), 0);
    });

    test('bad input: refused at publish naming the field; invalid data on the wire is dead-lettered and the rest flows', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const bus = newBus(namespace);
      const seen: number[] = [];
      bus.subscribe('strict', Ticked, (message) => {
        seen.push(message.data.seq);
      });
      await bus.start();

      const error = await bus.publish(Ticked, { key: 'x', seq: 'one' } as never).catch((e: unknown) => e);
      assert.ok(error instanceof ValidationError);
      assert.equal(error.code, 'INVALID_PAYLOAD');
      assert.deepEqual(
        error.issues.map((issue) => issue.path),
        ['seq'],
      );
      assert.match(error.message, /test\.ticked.*seq/);

      await bus.publish(Ticked, { key: 'x', seq: 1 });
      const corrupt = foreignTick('x', { key: 'x', seq: 'not a number' }, { id: `corrupt-${newId()}` });
      const inject =
        target.injectInvalid ?? ((backbone, envelope) => backbone.publish([{ envelope, json: JSON.stringify(envelope.data), keyHash: keyHash('x') }]));
      await inject(bus.backbone, corrupt);
      await bus.publish(Ticked, { key: 'x', seq: 2 });
      await waitFor('the valid messages around the invalid one', () => seen.includes(2));
      assert.deepEqual(seen, [1, 2]);
      const store = bus.backbone.deadLetters();
      await waitFor('the invalid message in dead letters', async () => (await store.count({ subscription: 'strict' })) === 1);
      const [letter] = (await store.list({ subscription: 'strict' })).deadLetters;
      assert.equal(letter!.messageId, corrupt.id);
      assert.match(letter!.reason, /invalid payload|seq/i);
    });

    test('graceful stop under load finishes and acknowledges what is in flight; a restart continues, nothing lost or doubled', async (t) => {
      if (!target.offers.durable) return t.skip(`${target.name} keeps nothing after its backbone closes`);
      const namespace = await world(t);
      if (namespace === undefined) return;
      let started = 0;
      let finished = 0;
      const handledIds = new Map<string, number>();
      const handler = async (message: Message<{ key: string; seq: number }>, ctx: HandlerContext<Tx>) => {
        started++;
        await sleep(2);
        if (namespace.effects !== undefined) await namespace.effects.write(ctx.tx, message);
        handledIds.set(message.id, (handledIds.get(message.id) ?? 0) + 1);
        finished++;
      };
      const total = 600;
      const first = newBus(namespace);
      first.subscribe('stoppable', Ticked, handler);
      await first.start();
      await first.publishMany(
        Ticked,
        Array.from({ length: total }, (_, i) => ({ key: `k${i % 20}`, seq: i })),
      );
      await waitFor('some progress', () => finished > 60);
      await stop(first);
      assert.equal(started, finished, 'stop() waited for every handler in flight');
      assert.ok(finished < total, 'stopped before the end');
      if (namespace.effects !== undefined)
        assert.equal((await namespace.effects.rows()).length, finished, 'every finished handler was acknowledged with its effect');

      const second = newBus(namespace);
      second.subscribe('stoppable', Ticked, handler);
      await second.start();
      await waitFor('the rest', () => handledIds.size >= total, 30_000);
      await sleep(300);
      assert.equal(handledIds.size, total, 'nothing lost');
      assert.equal([...handledIds.values()].filter((n) => n > 1).length, 0, 'nothing handled twice after a graceful stop');
      if (namespace.effects !== undefined) assert.equal((await namespace.effects.rows()).length, total);
    });

    test('a stop past its grace aborts the signal of a handler waiting on it; its message goes to the next worker, not to dead letters', async (t) => {
      if (!target.offers.durable) return t.skip(`${target.name} keeps nothing after its backbone closes`);
      const namespace = await world(t);
      if (namespace === undefined) return;
      // No retry left by the policy: an attempt the stop ended must still not dead-letter its message.
      const options = { retry: { immediate: 0, delayed: [] }, timeoutMs: 120_000 };
      const first = newBus(namespace, 'conformance', 300);
      let waiting = false;
      let reason: unknown;
      first.subscribe(
        'interrupted',
        Ticked,
        async (_message, ctx) => {
          waiting = true;
          await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve, { once: true }));
          reason = ctx.signal.reason;
          throw reason;
        },
        options,
      );
      await first.start();
      await first.publish(Ticked, { key: 'k', seq: 1 });
      await waitFor('the handler waiting on its signal', () => waiting, 20_000);
      const began = performance.now();
      await stop(first);
      const took = performance.now() - began;
      assert.equal((reason as { code?: string } | undefined)?.code, 'STOPPED', `aborted by the stop, not by ${String(reason)}`);
      assert.ok(took >= 290 && took < 30_000, `stop took ${took.toFixed(0)} ms with a grace of 300 ms`);

      const second = newBus(namespace);
      const handled: Array<{ seq: number; attempt: number }> = [];
      second.subscribe('interrupted', Ticked, (message, ctx) => void handled.push({ seq: message.data.seq, attempt: ctx.attempt }), options);
      await second.start();
      await waitFor('the message handled by the next worker', () => handled.length > 0, 30_000);
      await sleep(200);
      assert.deepEqual(handled, [{ seq: 1, attempt: 2 }], 'handled once more, the interrupted attempt counted');
      assert.equal(await second.backbone.deadLetters().count({ subscription: 'interrupted' }), 0, 'not dead-lettered');
    });

    test('exactly-once effect: a handler that fails after writing through ctx.tx leaves no write; the retry writes once', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const effects = namespace.effects;
      if (effects === undefined) return t.skip(`${target.name} offers handlers no transaction`);
      const bus = newBus(namespace);
      const tries = new Map<string, number>();
      bus.subscribe(
        'effects',
        Ticked,
        async (message, ctx) => {
          await effects.write(ctx.tx, message);
          const n = (tries.get(message.id) ?? 0) + 1;
          tries.set(message.id, n);
          if (message.data.seq % 3 === 0 && n === 1) throw new Error('crash after the write, before the ack');
        },
        { retry: { immediate: 0, delayed: [50], jitter: 0 } },
      );
      await bus.start();
      await bus.publishMany(
        Ticked,
        Array.from({ length: 150 }, (_, i) => ({ key: `k${i % 30}`, seq: i })),
      );
      await waitFor('150 effects', async () => (await effects.rows()).length >= 150);
      await sleep(300);
      const rows = await effects.rows();
      assert.equal(rows.length, 150, 'exactly one effect per message');
      assert.equal(new Set(rows.map((row) => row.messageId)).size, 150);
      const failing = [...tries.entries()].filter(([id]) => rows.find((row) => row.messageId === id)!.seq % 3 === 0);
      assert.equal(failing.length, 50);
      assert.ok(
        failing.every(([, n]) => n >= 2),
        'the failing third were tried again',
      );
    });

    test('the inbox: the same message id published twice is handled once', async (t) => {
      const namespace = await world(t);
      if (namespace === undefined) return;
      const bus = newBus(namespace);
      const handled: string[] = [];
      bus.subscribe('deduplicated', Ticked, (message) => {
        handled.push(message.id);
      });
      await bus.start();
      const id = newId();
      await bus.publish(Ticked, { key: 'dup', seq: 1 }, { id });
      await bus.publish(Ticked, { key: 'dup', seq: 1 }, { id });
      await bus.publish(Ticked, { key: 'dup', seq: 2 });
      await waitFor('the message after the duplicate', () => handled.length >= 2);
      await sleep(300);
      assert.deepEqual(handled.filter((handledId) => handledId === id).length, 1);
    });

    hostileInput(target, { world, newBus, stop });
    rollingDeploy({ world, newBus, stop });
    scheduledDelivery(target, { world, newBus, stop });
    recurringSchedules(target, { world, newBus, stop });
    commandOwners(target, { world, newBus, stop });
    requestReply(target, { world, newBus, stop });
    sagas(target, { world, newBus, stop });
    upcasting({ world, newBus, stop });
    tenancy(target, { world, newBus, stop });
  });
}
