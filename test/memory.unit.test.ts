/** The memory backbone through the bus: no server, so these run in the fast tier. */
import assert from 'node:assert/strict';
import { AsyncLocalStorage } from 'node:async_hooks';
import { test } from 'node:test';
import { z } from 'zod';
import { createBus, defineEvent, retryLater, TidingsError, type Bus, type SubscribeOptions } from '../src/index.ts';
import type { Clock } from '../src/core/clock.ts';
import { memory, MemoryTransaction, type MemoryBackbone } from '../src/memory/index.ts';
import { Ticked, ticksSeen } from './fixtures/contracts.ts';
import { noisyBacklogRun } from './fixtures/fairness.ts';
import { sleep, waitFor } from './helpers.ts';

const Shipped = defineEvent('test.shipped', {
  schema: z.object({ key: z.string(), seq: z.number().int() }),
  key: (data) => data.key,
});

/** A bus on `backbone` (a new one by default), stopped when the test ends. */
function busOn(t: { after(fn: () => Promise<void>): void }, backbone: MemoryBackbone = memory(), service = 'test'): Bus<MemoryTransaction> {
  const bus = createBus({ service, backbone });
  t.after(() => bus.stop());
  return bus;
}

const noWarnings = { onWarning: (message: string) => assert.fail(`unexpected warning: ${message}`) };

test('every subscription gets every message; a handler gets its own copy of the data, as JSON carried it', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const billing: number[] = [];
  const audit: unknown[] = [];
  bus.subscribe('billing', Ticked, (message) => {
    billing.push(message.data.seq);
    (message.data as { note?: string }).note = 'mutated by billing';
  });
  bus.subscribe('audit', Ticked, (message) => {
    audit.push(message.data);
  });
  await bus.start();
  const published = { key: 'k', seq: 0, note: undefined };
  await bus.publish(Ticked, published);
  await bus.publishMany(
    Ticked,
    [1, 2, 3].map((seq) => ({ key: `k${seq}`, seq })),
  );
  await backbone.drain();
  assert.deepEqual(billing.sort(), [0, 1, 2, 3]);
  assert.equal(audit.length, 4);
  // JSON drops undefined fields and the other subscription's mutation is not seen.
  assert.deepEqual(
    audit.find((data) => (data as { seq: number }).seq === 0),
    { key: 'k', seq: 0 },
  );
  assert.equal(published.note, undefined);
  assert.deepEqual(bus.stats().subscriptions.billing, { handled: 4, retried: 0, deadLettered: 0 });
});

test("handlers run in the consumer's async context, not in their publisher's", async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const context = new AsyncLocalStorage<string>();
  const seen: Array<string | undefined> = [];
  bus.subscribe('contexts', Ticked, () => {
    seen.push(context.getStore());
  });
  await context.run('consumer', () => bus.start());
  await context.run('publisher', () =>
    bus.publishMany(
      Ticked,
      [1, 2, 3].map((seq) => ({ key: 'k', seq })),
    ),
  );
  await backbone.drain();
  assert.deepEqual(seen, ['consumer', 'consumer', 'consumer']);
});

test('a transaction publishes iff it commits; onCommit runs only then', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const seen = await ticksSeen(bus, 's');
  const hooks: string[] = [];
  await bus.transaction(async (tx) => {
    await bus.publish(Ticked, { key: 'a', seq: 1 }, { tx });
    tx.onCommit(() => hooks.push('committed'));
    await sleep(20);
    // Buffered until the commit: nothing is visible yet.
    assert.deepEqual(seen, []);
    await bus.publish(Ticked, { key: 'a', seq: 2 }, { tx });
  });
  const failure = new Error('the caller changed its mind');
  let kept: MemoryTransaction | undefined;
  await assert.rejects(
    bus.transaction(async (tx) => {
      kept = tx;
      tx.onCommit(() => hooks.push('should not run'));
      await bus.publish(Ticked, { key: 'a', seq: 3 }, { tx });
      throw failure;
    }),
    (error) => error === failure,
  );
  await backbone.drain();
  assert.deepEqual(seen, [1, 2]);
  assert.deepEqual(hooks, ['committed']);
  assert.equal(kept?.state, 'rolled-back');
  // A finished transaction, and a transaction that is not the memory backbone's, are refused by name.
  await assert.rejects(
    bus.publish(Ticked, { key: 'a', seq: 4 }, { tx: kept }),
    (error) => error instanceof TidingsError && error.code === 'STOPPED' && /rolled back/.test(error.message),
  );
  await assert.rejects(
    bus.publish(Ticked, { key: 'a', seq: 5 }, { tx: { query: async () => ({ rows: [] }) } }),
    (error) => error instanceof TidingsError && error.code === 'NO_TRANSACTION' && /test\.ticked/.test(error.message),
  );
  await assert.rejects(
    bus.publish(Ticked, { key: 'a', seq: 6 }, { tx: new MemoryTransaction(memory(), 'another backbone') }),
    (error) => error instanceof TidingsError && error.code === 'NO_TRANSACTION' && /another memory backbone/.test(error.message),
  );
  await backbone.drain();
  assert.deepEqual(seen, [1, 2]);
});

test('per-key order: 100 keys x 50 messages with concurrency 8, each once, in order, never two of a key at once', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const lastSeq = new Map<string, number>();
  const running = new Set<string>();
  let inFlight = 0;
  let maxInFlight = 0;
  let handled = 0;
  bus.subscribe(
    'ordered',
    Ticked,
    async (message) => {
      const { key, seq } = message.data;
      assert.ok(!running.has(key), `two messages of key ${key} at once`);
      running.add(key);
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      assert.equal(seq, (lastSeq.get(key) ?? -1) + 1, `key ${key}: ${seq} after ${lastSeq.get(key)}`);
      // Let other keys in: real handlers await I/O.
      await new Promise((resolve) => setImmediate(resolve));
      lastSeq.set(key, seq);
      running.delete(key);
      inFlight--;
      handled++;
    },
    { concurrency: 8, partitions: 4 },
  );
  await bus.start();
  const keys = Array.from({ length: 100 }, (_, i) => `key-${i}`);
  for (let seq = 0; seq < 50; seq++)
    await bus.publishMany(
      Ticked,
      keys.map((key) => ({ key, seq })),
    );
  await backbone.drain();
  assert.equal(handled, 5_000);
  for (const key of keys) assert.equal(lastSeq.get(key), 49);
  assert.equal(maxInFlight, 8);
});

test('two consumers of one subscription share its work without breaking per-key order', async (t) => {
  const backbone = memory(noWarnings);
  const byWorker = [0, 0];
  const lastSeq = new Map<string, number>();
  const running = new Set<string>();
  const buses = [0, 1].map((worker) => {
    const bus = busOn(t, backbone, `worker-${worker}`);
    bus.subscribe(
      'shared',
      Ticked,
      async (message) => {
        const { key, seq } = message.data;
        assert.ok(!running.has(key), `two messages of key ${key} at once`);
        running.add(key);
        assert.equal(seq, (lastSeq.get(key) ?? -1) + 1, `key ${key}: ${seq} after ${lastSeq.get(key)}`);
        await new Promise((resolve) => setImmediate(resolve));
        lastSeq.set(key, seq);
        running.delete(key);
        byWorker[worker]!++;
      },
      { concurrency: 4, partitions: 8 },
    );
    return bus;
  });
  await buses[0]!.start();
  const keys = Array.from({ length: 40 }, (_, i) => `key-${i}`);
  for (let seq = 0; seq < 10; seq++)
    await buses[0]!.publishMany(
      Ticked,
      keys.map((key) => ({ key, seq })),
    );
  // The second worker joins mid-stream: lanes move to it while the first still has keys in flight.
  await waitFor('the first worker to get going', () => byWorker[0]! > 20);
  await buses[1]!.start();
  for (let seq = 10; seq < 20; seq++)
    await buses[1]!.publishMany(
      Ticked,
      keys.map((key) => ({ key, seq })),
    );
  await backbone.drain();
  assert.equal(byWorker[0]! + byWorker[1]!, 800);
  assert.ok(byWorker[1]! > 100, `the second worker handled only ${byWorker[1]}`);
  for (const key of keys) assert.equal(lastSeq.get(key), 19);
  // One stops: the other takes over its lanes.
  await buses[1]!.stop();
  await buses[0]!.publishMany(
    Ticked,
    keys.map((key) => ({ key, seq: 20 })),
  );
  await backbone.drain();
  for (const key of keys) assert.equal(lastSeq.get(key), 20);
});

test('retries: immediate, then delayed, then success; attempts counted', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const attempts: Array<{ attempt: number; at: number }> = [];
  bus.subscribe(
    'flaky',
    Ticked,
    (_message, ctx) => {
      attempts.push({ attempt: ctx.attempt, at: Date.now() });
      if (ctx.attempt < 3) throw new Error(`fails on attempt ${ctx.attempt}`);
    },
    { retry: { immediate: 1, delayed: [60], jitter: 0 } },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 1 });
  await backbone.drain();
  assert.deepEqual(
    attempts.map((a) => a.attempt),
    [1, 2, 3],
  );
  assert.ok(attempts[2]!.at - attempts[1]!.at >= 55, `the delayed retry came after ${attempts[2]!.at - attempts[1]!.at} ms`);
  assert.deepEqual(bus.stats().subscriptions.flaky, { handled: 1, retried: 2, deadLettered: 0 });
});

test('a key waiting for a retry holds back only itself', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const order: string[] = [];
  bus.subscribe(
    'held',
    Ticked,
    (message, ctx) => {
      const { key, seq } = message.data;
      order.push(`${key}${seq}#${ctx.attempt}`);
      if (key === 'a' && seq === 1 && ctx.attempt === 1) return retryLater(150);
    },
    { partitions: 1, retry: { immediate: 0, delayed: [1_000], jitter: 0 } },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1 });
  await bus.publish(Ticked, { key: 'a', seq: 2 });
  for (let seq = 1; seq <= 5; seq++) await bus.publish(Ticked, { key: 'b', seq });
  await waitFor('key b to be handled', () => order.includes('b5#1'));
  // Same partition, other key: b went on while a waits; a's second message waits behind its first.
  assert.ok(!order.includes('a2#1'), `a2 ran before a1 succeeded: ${order.join(' ')}`);
  await backbone.drain();
  const a = order.filter((entry) => entry.startsWith('a'));
  assert.deepEqual(a, ['a1#1', 'a1#2', 'a2#1']);
});

test('dead letters keep the attempt history; a redrive is handled once, and the inbox ignores the id afterwards', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  let broken = true;
  const handled: string[] = [];
  bus.subscribe(
    'poison',
    Ticked,
    (message) => {
      if (broken && message.data.key === 'bad') throw new Error(`gateway refused ${message.data.seq}`);
      handled.push(`${message.data.key}${message.data.seq}`);
    },
    { retry: { immediate: 2, delayed: [], jitter: 0 } },
  );
  await bus.start();
  const { id } = await bus.publish(Ticked, { key: 'bad', seq: 1 });
  await bus.publish(Ticked, { key: 'bad', seq: 2 });
  await bus.publish(Ticked, { key: 'good', seq: 1 });
  await backbone.drain();
  // After a dead letter, the key's next messages proceed (seq 2 also dies: the gateway is still broken).
  assert.deepEqual(handled, ['good1']);
  const store = backbone.deadLetters();
  assert.equal(await store.count({ subscription: 'poison' }), 2);
  const listed = await store.list({ errorText: 'REFUSED 1' });
  assert.equal(listed.total, 1);
  assert.equal(listed.deadLetters[0]!.messageId, id);
  assert.equal(listed.deadLetters[0]!.attempts, 3);
  const [dead] = await store.show(id);
  assert.ok(dead !== undefined);
  assert.deepEqual(
    dead.attempts.map((a) => a.attempt),
    [1, 2, 3],
  );
  assert.match(dead.attempts[2]!.error.message, /gateway refused 1/);
  assert.ok(dead.attempts[0]!.error.stack?.includes('Error: gateway refused 1'));
  assert.match(dead.reason, /failed 3 attempts/);
  assert.deepEqual(dead.envelope.data, { key: 'bad', seq: 1 });
  await assert.rejects(store.redrive({}), (error) => error instanceof TidingsError && error.code === 'INVALID_OPTIONS');

  broken = false;
  const redriven = await store.redrive({ subscription: 'poison' });
  assert.deepEqual(redriven.bySubscription, { poison: 2 });
  await backbone.drain();
  // In order, once each.
  assert.deepEqual(handled, ['good1', 'bad1', 'bad2']);
  assert.equal(await store.count({ all: true }), 0);
  // The same id published again (a retried publish) is recognised by the inbox.
  await bus.publish(Ticked, { key: 'bad', seq: 1 }, { id });
  await backbone.drain();
  assert.deepEqual(handled, ['good1', 'bad1', 'bad2']);

  // Drop removes for good.
  broken = true;
  await bus.publish(Ticked, { key: 'bad', seq: 3 });
  await backbone.drain();
  const dropped = await store.drop({ topic: 'test.ticked' });
  assert.equal(dropped.count, 1);
  assert.equal((await store.list({})).total, 0);
});

test('maxDeadLetters drops the oldest with a warning; a redrive can be stopped by its signal', async (t) => {
  const warnings: string[] = [];
  const backbone = memory({ maxDeadLetters: 2, onWarning: (message) => warnings.push(message) });
  const bus = busOn(t, backbone);
  bus.subscribe('doomed', Ticked, (message) => retryLater(1, `no ${message.data.seq}`), { retry: { immediate: 0, delayed: [], jitter: 0 } });
  await bus.start();
  for (let seq = 1; seq <= 3; seq++) await bus.publish(Ticked, { key: `k${seq}`, seq });
  await backbone.drain();
  const store = backbone.deadLetters();
  const { deadLetters } = await store.list({ subscription: 'doomed' });
  assert.deepEqual(deadLetters.map((letter) => letter.key).sort(), ['k2', 'k3']);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /at most 2 dead letters \(maxDeadLetters\): dropped the oldest, .* of subscription doomed/);
  const stopped = await store.redrive({ all: true, signal: AbortSignal.abort() });
  assert.deepEqual({ matched: stopped.matched, count: stopped.count, stopped: stopped.stopped }, { matched: 2, count: 0, stopped: true });
  await assert.rejects(store.redrive({ all: true, ratePerSecond: 0 }), /ratePerSecond must be a positive number/);
  assert.equal(await store.count({ all: true }), 2);
});

test('what a handler publishes joins its transaction: dropped when it fails, delivered once when it succeeds', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const shipped: Array<{ seq: number; causationId: string | undefined; correlationId: string }> = [];
  let committed = 0;
  bus.subscribe(
    'orders',
    Ticked,
    // The context destructured, as handlers often take it.
    async (message, { publish, tx, attempt }) => {
      await publish(Shipped, { key: message.data.key, seq: message.data.seq });
      // bus.publish inside a handler joins the same transaction.
      await bus.publish(Shipped, { key: message.data.key, seq: message.data.seq + 100 });
      tx.onCommit(() => committed++);
      if (attempt === 1) throw new Error('fails after publishing');
    },
    { retry: { immediate: 1, delayed: [], jitter: 0 } },
  );
  bus.subscribe('shipping', Shipped, (message) => {
    shipped.push({ seq: message.data.seq, causationId: message.causationId, correlationId: message.correlationId });
  });
  await bus.start();
  const { id } = await bus.publish(Ticked, { key: 'o-1', seq: 1 });
  await backbone.drain();
  assert.deepEqual(
    shipped.map((s) => s.seq),
    [1, 101],
  );
  assert.equal(committed, 1);
  for (const message of shipped) {
    assert.equal(message.causationId, id);
    assert.equal(message.correlationId, id);
  }
});

test('graceful stop finishes what is in flight, starts nothing new, and a new bus continues where it left off', async (t) => {
  const backbone = memory(noWarnings);
  const first = createBus({ service: 'first', backbone });
  let release!: () => void;
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  const started: number[] = [];
  const finished: number[] = [];
  first.subscribe(
    'stoppable',
    Ticked,
    async (message) => {
      started.push(message.data.seq);
      await gate;
      finished.push(message.data.seq);
    },
    { concurrency: 3 },
  );
  await first.start();
  await first.publishMany(
    Ticked,
    Array.from({ length: 10 }, (_, seq) => ({ key: `k${seq}`, seq })),
  );
  await waitFor('three handlers in flight', () => started.length === 3);
  let stopped = false;
  const stopping = first.stop().then(() => {
    stopped = true;
  });
  await sleep(30);
  assert.equal(stopped, false, 'stop() resolved with handlers still running');
  release();
  await stopping;
  assert.deepEqual(finished.sort(), started.sort());
  assert.equal(started.length, 3);
  assert.equal(first.stats().subscriptions.stoppable!.handled, 3);

  const second = busOn(t, backbone, 'second');
  const rest: number[] = [];
  second.subscribe('stoppable', Ticked, (message) => {
    rest.push(message.data.seq);
  });
  await second.start();
  await backbone.drain();
  assert.equal(rest.length, 7);
  assert.deepEqual(
    [...started, ...rest].sort((a, b) => a - b),
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
  );
});

test('drain() waits for cascades and retries, ignores stopped subscriptions, and says what is left when it gives up', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const shipped: number[] = [];
  bus.subscribe('orders', Ticked, async (message, ctx) => {
    await ctx.publish(Shipped, { key: message.data.key, seq: message.data.seq });
  });
  bus.subscribe(
    'shipping',
    Shipped,
    (message, ctx) => {
      if (ctx.attempt === 1) return retryLater(30);
      shipped.push(message.data.seq);
    },
    { retry: { immediate: 0, delayed: [30], jitter: 0 } },
  );
  bus.subscribe('stuck', Ticked, () => retryLater(60_000), { retry: { immediate: 0, delayed: [60_000], jitter: 0 } });
  await bus.start();
  await backbone.drain(); // nothing published yet
  await bus.publishMany(
    Ticked,
    [1, 2, 3].map((seq) => ({ key: `k${seq}`, seq })),
  );
  const error = await backbone.drain({ timeoutMs: 600 }).catch((e: unknown) => e);
  assert.ok(error instanceof TidingsError && error.code === 'TIMEOUT', String(error));
  assert.match(error.message, /subscription stuck has 3 unhandled \(0 in flight, 3 keys waiting for a retry\)/);
  assert.doesNotMatch(error.message, /subscription (orders|shipping)/);
  assert.deepEqual(shipped.sort(), [1, 2, 3]);
  assert.throws(() => backbone.drain({ timeoutMs: -1 }), /timeoutMs must be an integer/);
  // A subscription with no running consumer is not waited for: its messages wait for the next one.
  await bus.stop();
  await backbone.drain({ timeoutMs: 100 });
});

test('a handler that outlives its timeout cannot publish any more; the retry publishes once', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const late: unknown[] = [];
  const shipped: number[] = [];
  bus.subscribe(
    'slow',
    Ticked,
    async (message, ctx) => {
      if (ctx.attempt === 1) {
        await sleep(80);
        await ctx.publish(Shipped, { key: message.data.key, seq: -1 }).catch((error: unknown) => late.push(error));
        return;
      }
      await ctx.publish(Shipped, { key: message.data.key, seq: message.data.seq });
    },
    { timeoutMs: 20, retry: { immediate: 1, delayed: [], jitter: 0 } },
  );
  bus.subscribe('shipping', Shipped, (message) => void shipped.push(message.data.seq));
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 7 });
  await backbone.drain();
  await waitFor('the late publish to be refused', () => late.length === 1);
  assert.ok(late[0] instanceof TidingsError && late[0].code === 'STOPPED' && /attempt 1 .* has already rolled back/.test(late[0].message), String(late[0]));
  await backbone.drain();
  assert.deepEqual(shipped, [7]);
});

test('startFrom: a new subscription sees the log from the beginning, or only what comes next; maxLog forgets the oldest with a warning', async (t) => {
  const warnings: string[] = [];
  const backbone = memory({ maxLog: 3, onWarning: (message) => warnings.push(message) });
  const bus = busOn(t, backbone);
  await bus.start();
  await bus.publishMany(
    Ticked,
    [1, 2, 3, 4, 5].map((seq) => ({ key: 'k', seq })),
  );
  const fromStart: number[] = [];
  const fromNow: number[] = [];
  bus.subscribe('from-start', Ticked, (m) => void fromStart.push(m.data.seq), { startFrom: 'beginning' });
  bus.subscribe('from-now', Ticked, (m) => void fromNow.push(m.data.seq));
  await waitFor('both subscriptions to run', async () => {
    await backbone.drain();
    return fromStart.length === 3;
  });
  await bus.publish(Ticked, { key: 'k', seq: 6 });
  await backbone.drain();
  assert.deepEqual(fromStart, [3, 4, 5, 6]);
  assert.deepEqual(fromNow, [6]);
  assert.equal(warnings.length, 1);
  assert.match(warnings[0]!, /from-start starts from the beginning, but the memory backbone has forgotten its 2 oldest messages \(it keeps maxLog = 3\)/);
});

test('options are validated by name; a changed partition count is refused', async (t) => {
  assert.throws(
    () => memory({ maxLog: -1, maxDeadLetters: 0, drainTimeoutMs: 1.5 }),
    (error) =>
      error instanceof TidingsError &&
      error.code === 'INVALID_OPTIONS' &&
      /maxLog must be/.test(error.message) &&
      /maxDeadLetters must be/.test(error.message) &&
      /drainTimeoutMs must be/.test(error.message),
  );
  const backbone = memory(noWarnings);
  const one = busOn(t, backbone, 'one');
  one.subscribe('counted', Ticked, () => undefined, { partitions: 4 });
  await one.start();
  const two = busOn(t, backbone, 'two');
  two.subscribe('counted', Ticked, () => undefined, { partitions: 8 });
  await assert.rejects(
    two.start(),
    (error) => error instanceof TidingsError && error.code === 'SUBSCRIPTION_CONFLICT' && /Keep partitions: 4/.test(error.message),
  );
});

test('100,000 messages through one subscription: each once, in order per key (timing printed)', async (t) => {
  const backbone = memory(noWarnings);
  const bus = busOn(t, backbone);
  const lastSeq = new Map<string, number>();
  let handled = 0;
  let outOfOrder = 0;
  bus.subscribe(
    'bulk',
    Ticked,
    (message) => {
      const { key, seq } = message.data;
      if (seq !== (lastSeq.get(key) ?? -1) + 1) outOfOrder++;
      lastSeq.set(key, seq);
      handled++;
    },
    { concurrency: 16 },
  );
  await bus.start();
  const started = performance.now();
  const total = 100_000;
  const batch: Array<{ key: string; seq: number }> = [];
  for (let i = 0; i < total; i++) {
    batch.push({ key: `key-${i % 1_000}`, seq: Math.floor(i / 1_000) });
    if (batch.length === 1_000) await bus.publishMany(Ticked, batch.splice(0));
  }
  const published = performance.now();
  await backbone.drain({ timeoutMs: 60_000 });
  const done = performance.now();
  assert.equal(handled, total);
  assert.equal(outOfOrder, 0);
  t.diagnostic(
    `published ${total} in ${Math.round(published - started)} ms, handled all in ${Math.round(done - published)} ms more (${Math.round(total / ((done - started) / 1_000))} messages/s end to end)`,
  );
});

test('handler timeouts: each attempt gets its whole timeout from its own start, however many are in flight', async (t) => {
  const bus = busOn(t);
  const lasted = new Map<number, number>();
  let quick = 0;
  bus.subscribe(
    'timeouts',
    Ticked,
    async (message, ctx) => {
      if (message.data.seq === 0) {
        quick++;
        return;
      }
      const started = performance.now();
      await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve, { once: true }));
      lasted.set(message.data.seq, performance.now() - started);
    },
    { timeoutMs: 100, concurrency: 8, retry: { immediate: 0, delayed: [] } },
  );
  await bus.start();
  // Hung handlers that start 40 ms apart, with quick ones in between that finish long before them.
  for (let seq = 1; seq <= 4; seq++) {
    await bus.publishMany(Ticked, [
      { key: `hung-${seq}`, seq },
      { key: `quick-${seq}`, seq: 0 },
    ]);
    await sleep(40);
  }
  await waitFor('every hung handler timed out', () => lasted.size === 4);
  assert.equal(quick, 4);
  for (const [seq, ms] of lasted) {
    assert.ok(ms >= 98, `handler ${seq} was abandoned after ${ms.toFixed(1)} ms, before its 100 ms timeout`);
    assert.ok(ms < 600, `handler ${seq} was abandoned only after ${ms.toFixed(1)} ms`);
  }
  await waitFor('the timed-out messages dead-lettered', () => bus.stats().subscriptions.timeouts?.deadLettered === 4);
  assert.deepEqual(bus.stats().subscriptions.timeouts, { handled: 4, retried: 0, deadLettered: 4 });
});

test('ctx.signal: quiet when the handler finishes, already aborted when first read after a timeout, aborted when the bus stops after its grace', async (t) => {
  const seen: Array<{ seq: number; aborted: boolean; reason?: string | undefined }> = [];
  const timeouts = busOn(t);
  timeouts.subscribe(
    'signals',
    Ticked,
    async (message, ctx) => {
      const seq = message.data.seq;
      if (seq === 1) await sleep(150); // outlives its timeout without looking at the signal, then looks
      seen.push({ seq, aborted: ctx.signal.aborted, reason: (ctx.signal.reason as Error | undefined)?.name });
    },
    { timeoutMs: 60, retry: { immediate: 0, delayed: [] } },
  );
  await timeouts.start();
  await timeouts.publishMany(Ticked, [
    { key: 'a', seq: 0 },
    { key: 'b', seq: 1 },
  ]);
  await waitFor('both handlers', () => seen.length === 2);
  assert.deepEqual(
    seen.sort((a, b) => a.seq - b.seq),
    [
      { seq: 0, aborted: false, reason: undefined },
      { seq: 1, aborted: true, reason: 'HandlerTimeoutError' },
    ],
  );

  // bus.stop(): the handlers in flight finish within the grace, and one still running after it is told through
  // its signal (not its 30 s timeout, which is what ended it before stopGraceMs).
  const stopped = createBus({ service: 'test', backbone: memory(), stopGraceMs: 150 });
  t.after(() => stopped.stop());
  let inFlight = 0;
  let quickFinished: boolean | undefined;
  let stopReason: unknown;
  stopped.subscribe('waits-for-stop', Ticked, async (message, ctx) => {
    inFlight++;
    if (message.data.seq === 3) {
      await sleep(80); // in flight when the stop begins, done within the grace: never aborted
      quickFinished = !ctx.signal.aborted;
      return;
    }
    const signal = ctx.signal;
    await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
    stopReason = signal.reason;
  });
  await stopped.start();
  await stopped.publishMany(Ticked, [
    { key: 'c', seq: 2 },
    { key: 'd', seq: 3 },
  ]);
  await waitFor('both handlers in flight', () => inFlight === 2);
  const began = performance.now();
  await stopped.stop();
  const took = performance.now() - began;
  assert.equal(quickFinished, true, 'the handler that finished within the grace saw no abort');
  assert.ok(stopReason instanceof TidingsError && stopReason.code === 'STOPPED', `aborted by the stop, not by ${String(stopReason)}`);
  assert.ok(took >= 140 && took < 5_000, `stop took ${took.toFixed(0)} ms with a grace of 150 ms`);
});

test("a scheduled message is never handled before its due time, even when the timer fires early (Node's timers can, by a millisecond)", async (t) => {
  // The wall clock, with timers that fire 20 ms before they are due.
  const early: Clock = {
    now: () => Date.now(),
    setTimeout: (fn, ms) => setTimeout(fn, Math.max(0, ms - 20)),
    clearTimeout: (timer) => clearTimeout(timer as NodeJS.Timeout | undefined),
  };
  const bus = busOn(t, memory({ clock: early }));
  const handledAt = new Map<number, number>();
  bus.subscribe('early', Ticked, async (message) => {
    handledAt.set(message.data.seq, Date.now());
  });
  await bus.start();
  const due = Date.now() + 100;
  await bus.publish(Ticked, { key: 'a', seq: 1 }, { deliverAt: new Date(due) });
  const cancelled = await bus.publish(Ticked, { key: 'b', seq: 2 }, { deliverAt: new Date(due) });
  await sleep(90); // past the first early firing (at +80 ms): it waited the rest, and can still be cancelled
  assert.equal(await bus.cancelScheduled(cancelled.id), true, 'still waiting after its timer fired early');
  await waitFor('the scheduled message', () => handledAt.has(1), 5_000);
  assert.ok(handledAt.get(1)! >= due, `handled ${due - handledAt.get(1)!} ms early`);
  await sleep(50);
  assert.equal(handledAt.has(2), false, 'the cancelled one never');
});

test("fair shares on the memory backbone: a noisy tenant's backlog gets its share of the slots, the quiet tenants the rest; weights, per-key order", async (t) => {
  const run = (options: SubscribeOptions) => noisyBacklogRun(busOn(t), { partitions: 2, ...options });
  const fair = await run({ tenantConcurrency: 1 });
  assert.equal(fair.peakNoisy, 1, 'one noisy key in flight at a time');
  assert.ok(fair.noisyBeforeQuiet <= 4, `${fair.noisyBeforeQuiet} noisy messages were handled before the last quiet one`);
  const unfair = await run({});
  assert.equal(unfair.peakNoisy, 4, 'without shares the noisy keys take every slot');
  assert.ok(unfair.noisyBeforeQuiet >= 8, `without shares: ${unfair.noisyBeforeQuiet} noisy messages before the last quiet one`);
  assert.equal((await run({ tenantConcurrency: 1, tenantWeights: { noisy: 3 } })).peakNoisy, 3, 'a weight of 3: three noisy keys at once');
});
