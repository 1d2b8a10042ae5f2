/**
 * The NATS JetStream backbone end to end through createBus, against the real server (NATS_URL) and, for
 * the outbox, PostgreSQL (DATABASE_URL). Each test has its own stream and subject prefix.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { connect as natsConnect, createInbox, headers as natsHeaders, nanos, AckPolicy, DeliverPolicy, JSONCodec, type Msg } from 'nats';
import { keyHash } from '../src/index.ts';
import { nats, natsDefaults } from '../src/nats/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { foreignTick, Ticked, ticksSeen } from './fixtures/contracts.ts';
import { DATABASE_URL, dropSchema, NATS_URL, requirePostgres, sleep, uniqueSchema, waitFor } from './helpers.ts';
import { natsWorld, quickNats } from './fixtures/nats.ts';

describe('nats backbone', () => {
  test('publish and subscribe; options are validated by name', async (t) => {
    assert.throws(() => nats({ servers: NATS_URL, buckets: 0, leaseMs: 10 }), /buckets must be an integer from 1 to 1024.*leaseMs/);
    assert.throws(() => nats({ servers: NATS_URL, leaseMs: 5_000 }), /leaseMs \(5000\) must exceed ackWaitMs \+ heartbeatMs/);
    assert.equal(natsDefaults.stream, 'TIDINGS');
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const b = ns.bus('nats-test');
    const seen = await ticksSeen(b, 'smoke');
    await b.publish(Ticked, { key: 'a', seq: 1 });
    await b.publishMany(Ticked, [
      { key: 'a', seq: 2 },
      { key: 'b', seq: 3 },
    ]);
    await waitFor('three messages', () => seen.length === 3);
    assert.deepEqual(seen.sort(), [1, 2, 3]);
  });

  test('with an outbox: a rolled-back transaction publishes nothing, a committed one arrives through the relay; a relay retry is stored once', async (t) => {
    const ns = await natsWorld(t);
    if (ns === undefined || !(await requirePostgres(t))) return;
    const schema = uniqueSchema('natsob');
    t.after(() => dropSchema(schema));
    const b = ns.bus('nats-test', { outbox: postgres({ url: DATABASE_URL, schema, leaseMs: 2_000, heartbeatMs: 500, pollMs: 1_000 }) });
    const seen: string[] = [];
    b.subscribe('outboxed', Ticked, async (message, ctx) => {
      await ctx.tx.query('select 1');
      seen.push(`${message.data.key}:${message.data.seq}`);
    });
    await b.start();
    await assert.rejects(
      b.transaction(async (tx) => {
        await b.publish(Ticked, { key: 'rolled-back', seq: 1 }, { tx });
        throw new Error('rolled back on purpose');
      }),
      /rolled back on purpose/,
    );
    await b.transaction((tx) => b.publish(Ticked, { key: 'committed', seq: 1 }, { tx }));
    await waitFor('the committed message', () => seen.length >= 1);
    await sleep(300);
    assert.deepEqual(seen, ['committed:1']);

    // The relay hands a message to JetStream again when it did not hear the first confirmation.
    const backbone = b.backbone as ReturnType<typeof nats>;
    const envelope = foreignTick('dup', { key: 'dup', seq: 1 });
    const outgoing = { envelope, json: JSON.stringify(envelope.data), keyHash: keyHash('dup') };
    await backbone.broker.publish([outgoing]);
    await backbone.broker.publish([outgoing]);
    await waitFor('the duplicated message', () => seen.includes('dup:1'));
    const nc = await natsConnect({ servers: NATS_URL });
    try {
      const info = await (await nc.jetstreamManager()).streams.info(ns.stream);
      assert.equal(info.state.messages, 2, 'committed:1 and one copy of dup:1 in the stream');
    } finally {
      await nc.close();
    }
    await sleep(300);
    assert.equal(seen.filter((s) => s === 'dup:1').length, 1);
  });

  test('per-key order over 100 keys with two buses of one subscription and concurrent publishers', async (t) => {
    // At least once, in order: every message is handled, the first handlings of a key are in stream order,
    // never two handlers of one key run at once, and a message is handled again only as a redelivery (attempt
    // > 1) after its bucket changed hands (a lost lease: a process stalled past leaseMs on a loaded machine).
    // A redelivery of what a lane acknowledged itself (its ack late past ack_wait) is not handled again.
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const publisher = ns.bus('publisher');
    await publisher.start();
    const handled: Array<{ key: string; seq: number; worker: number; attempt: number }> = [];
    const running = new Map<string, number>();
    const overlaps: string[] = [];
    const lostLeases: string[] = [];
    for (const worker of [0, 1]) {
      const b = ns.bus(`worker-${worker}`, { onWarning: (text: string) => (/lost the lease/.test(text) ? lostLeases.push(text) : undefined) });
      b.subscribe(
        'ordered',
        Ticked,
        async (message, ctx) => {
          const { key, seq } = message.data;
          handled.push({ key, seq, worker, attempt: ctx.attempt });
          running.set(key, (running.get(key) ?? 0) + 1);
          if (running.get(key)! > 1) overlaps.push(`${key}:${seq} on worker ${worker}`);
          await sleep(seq % 5 === 0 ? 1 : 0);
          running.set(key, running.get(key)! - 1);
        },
        { concurrency: 16 },
      );
      await b.start();
    }
    await sleep(1_000); // both workers hold their buckets
    const keys = 100;
    const perKey = 10;
    await Promise.all(
      Array.from({ length: 5 }, async (_, p) => {
        for (let seq = 0; seq < perKey; seq++) {
          const data = [];
          for (let k = p; k < keys; k += 5) data.push({ key: `key-${k}`, seq });
          await publisher.publishMany(Ticked, data);
        }
      }),
    );
    const firsts = new Map<string, typeof handled>();
    const again: typeof handled = [];
    const sort = () => {
      firsts.clear();
      again.length = 0;
      for (const h of handled) {
        const line = firsts.get(h.key) ?? [];
        firsts.set(h.key, line);
        if (line.some((f) => f.seq === h.seq)) again.push(h);
        else line.push(h);
      }
      return handled.length - again.length;
    };
    await waitFor('every message', () => sort() >= keys * perKey, 30_000);
    await sleep(300);
    sort();
    assert.deepEqual(overlaps, [], 'never two handlers of one key at once');
    assert.equal(firsts.size, keys);
    for (const [key, line] of firsts)
      assert.deepEqual(
        line.map((h) => h.seq),
        Array.from({ length: perKey }, (_, i) => i),
        `order of ${key}`,
      );
    assert.deepEqual(
      again.filter((h) => h.attempt < 2),
      [],
      'handled again only as a redelivery',
    );
    if (lostLeases.length === 0) assert.deepEqual(again, [], 'none twice while no lease was lost');
    else t.diagnostic(`${lostLeases.length} leases lost in a stall; ${again.length} messages redelivered and handled again`);
    const byWorker = [0, 1].map((w) => handled.filter((h) => h.worker === w).length);
    assert.ok(byWorker[0]! > 0 && byWorker[1]! > 0, `both workers took part (${byWorker.join(' / ')})`);
  });

  test('a message whose acknowledgement reached JetStream after its ack wait is not handled again when it is redelivered', async (t) => {
    // A stalled process (here a handler that blocks the event loop) sends the acknowledgement of a message it
    // handled after the ack wait ran out; JetStream redelivers it, and the lane, which no longer holds it,
    // must end the copy rather than handle it again after its key's later messages.
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const b = ns.bus('stalled', { buckets: 1, ackWaitMs: 500 });
    const handled: string[] = [];
    b.subscribe(
      'stalled',
      Ticked,
      (message, ctx) => {
        handled.push(`${message.data.key}:${message.data.seq}@${ctx.attempt}`);
        if (message.data.note === 'block') {
          const until = Date.now() + 1_500; // past the ack wait, short of leaseMs - heartbeatMs
          while (Date.now() < until) {
            // blocks the event loop: no acknowledgement or keep-alive goes out meanwhile
          }
        }
      },
      { concurrency: 2 },
    );
    await b.start();
    await b.publishMany(Ticked, [
      { key: 'a', seq: 0 },
      { key: 'b', seq: 0, note: 'block' },
    ]);
    await waitFor('both', () => handled.length >= 2);
    await b.publish(Ticked, { key: 'a', seq: 1 });
    await waitFor('a:1', () => handled.some((h) => h.startsWith('a:1')));
    await sleep(1_500);
    assert.deepEqual(handled.sort(), ['a:0@1', 'a:1@1', 'b:0@1']);
  });

  test('a delayed retry holds its key only, then succeeds; exhausted retries dead-letter with every attempt; redrive delivers once', async (t) => {
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const b = ns.bus('nats-test');
    const order: string[] = [];
    const attempts = new Map<string, number[]>();
    let poisoned = true;
    b.subscribe(
      'retrying',
      Ticked,
      (message, ctx) => {
        const id = `${message.data.key}:${message.data.seq}`;
        attempts.set(id, [...(attempts.get(id) ?? []), ctx.attempt]);
        if (message.data.note === 'flaky' && ctx.attempt < 3) throw new Error(`flaky ${id}`);
        if (message.data.note === 'poison' && poisoned) throw new Error(`poison ${id}`);
        order.push(id);
      },
      { retry: { immediate: 1, delayed: [200, 200], jitter: 0 } },
    );
    await b.start();
    await b.publish(Ticked, { key: 'k', seq: 1, note: 'flaky' });
    await b.publish(Ticked, { key: 'k', seq: 2 });
    await b.publish(Ticked, { key: 'other', seq: 1 });
    await b.publish(Ticked, { key: 'p', seq: 1, note: 'poison' });
    await b.publish(Ticked, { key: 'p', seq: 2 });
    await waitFor('k:2 and p:2', () => order.includes('k:2') && order.includes('p:2'), 10_000);
    assert.deepEqual(attempts.get('k:1'), [1, 2, 3], 'attempt numbers 1, 2 (immediate), 3 (delayed)');
    assert.ok(order.indexOf('k:1') < order.indexOf('k:2'), 'k:2 waited for k:1');
    assert.ok(order.indexOf('other:1') < order.indexOf('k:1'), 'another key did not wait');
    assert.deepEqual(attempts.get('p:1'), [1, 2, 3, 4]);

    const store = b.backbone.deadLetters();
    await waitFor('the dead letter', async () => (await store.count({ subscription: 'retrying' })) === 1);
    const [summary] = (await store.list({ subscription: 'retrying' })).deadLetters;
    assert.equal(summary!.attempts, 4);
    assert.match(summary!.reason, /failed 4 attempts; last error: poison p:1/);
    const [letter] = await store.show(summary!.messageId);
    assert.deepEqual(
      letter!.attempts.map((a) => a.attempt),
      [1, 2, 3, 4],
    );
    assert.match(letter!.attempts[0]!.error.stack ?? '', /poison p:1/);
    assert.deepEqual(letter!.envelope.data, { key: 'p', seq: 1, note: 'poison' });
    await assert.rejects(store.drop({}), /all: true/);

    poisoned = false;
    assert.equal((await store.redrive({ ids: [summary!.id] })).count, 1);
    await waitFor('the redriven p:1', () => order.includes('p:1'));
    await sleep(500);
    assert.equal(order.filter((id) => id === 'p:1').length, 1, 'handled once');
    assert.equal(await store.count({ all: true }), 0);
  });

  test("a delayed retry handed over by a stopping worker keeps its time and history on the next owner, before its key's later messages", async (t) => {
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const retry = { immediate: 0, delayed: [3_000], jitter: 0 };
    const handled: Array<{ worker: string; id: string; attempt: number; at: number }> = [];
    const workerBus = (name: string) => {
      const b = ns.bus(name);
      b.subscribe(
        'handover',
        Ticked,
        (message, ctx) => {
          handled.push({ worker: name, id: `${message.data.key}:${message.data.seq}`, attempt: ctx.attempt, at: Date.now() });
          if (message.data.note === 'fail') throw new Error(`${name} refused attempt ${ctx.attempt}`);
        },
        { retry },
      );
      return b;
    };
    const first = workerBus('first');
    await first.start();
    await first.publish(Ticked, { key: 'h', seq: 0, note: 'fail' });
    await first.publishMany(
      Ticked,
      [1, 2].map((seq) => ({ key: 'h', seq })),
    );
    await waitFor('the first attempt', () => handled.some((h) => h.id === 'h:0'));
    const failedAt = handled[0]!.at;
    await first.stop(); // hands the bucket back while h:0 waits for its retry
    const second = workerBus('second');
    await second.start();
    await waitFor("the key's later messages", () => handled.some((h) => h.id === 'h:2'), 15_000);
    const retried = handled.filter((h) => h.id === 'h:0' && h.worker === 'second');
    assert.equal(retried.length, 1);
    assert.equal(retried[0]!.attempt, 2);
    assert.ok(retried[0]!.at >= failedAt + retry.delayed[0]! - 50, `at its time, not at once (${retried[0]!.at - failedAt} ms after the first attempt)`);
    assert.deepEqual(
      handled.filter((h) => h.id !== 'h:0').map((h) => `${h.worker} ${h.id}`),
      ['second h:1', 'second h:2'],
    );
    const store = second.backbone.deadLetters();
    await waitFor('the dead letter', async () => (await store.count({ subscription: 'handover' })) === 1);
    const [letter] = await store.show((await store.list({ subscription: 'handover' })).deadLetters[0]!.messageId);
    assert.deepEqual(
      letter!.attempts.map((a) => a.error.message),
      ['first refused attempt 1', 'second refused attempt 2'],
    );
  });

  test('undecodable messages from a plain NATS client are dead-lettered with the reason; the rest flows', async (t) => {
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const b = ns.bus('nats-test');
    const seen = await ticksSeen(b, 'tolerant');
    const bucket = keyHash('x') % quickNats.buckets;
    const subject = `${ns.subjectPrefix}.${bucket}.${Ticked.topic}`;
    await b.publish(Ticked, { key: 'x', seq: 1 });
    const nc = await natsConnect({ servers: NATS_URL });
    try {
      const js = nc.jetstream();
      await js.publish(subject, Buffer.from('{"key":"x","seq":99}')); // no CloudEvents headers at all
      const h = natsHeaders();
      for (const [name, value] of [
        ['ce-specversion', '1.0'],
        ['ce-id', 'not-json-1'],
        ['ce-source', 'tidings://foreign'],
        ['ce-type', 'test.ticked.v1'],
        ['ce-partitionkey', 'x'],
      ])
        h.set(name!, value!);
      await js.publish(subject, Buffer.from('this is not json'), { headers: h });
    } finally {
      await nc.close();
    }
    await b.publish(Ticked, { key: 'x', seq: 2 });
    await waitFor('the valid messages', () => seen.includes(2));
    assert.deepEqual(seen, [1, 2]);
    const store = b.backbone.deadLetters();
    await waitFor('two dead letters', async () => (await store.count({ subscription: 'tolerant' })) === 2);
    const { deadLetters } = await store.list({ subscription: 'tolerant' });
    for (const letter of deadLetters) {
      assert.match(
        letter.reason,
        new RegExp(`UNDECODABLE_MESSAGE: the message at subject ${subject.replace(/\./g, '\\.')}, stream ${ns.stream} sequence \\d+`),
      );
    }
    assert.match(deadLetters[0]!.reason, /no CloudEvents attributes ce-specversion, ce-id, ce-source, ce-type/);
    assert.match(deadLetters[1]!.reason, /payload is not JSON/);
    assert.equal(deadLetters[1]!.messageId, 'not-json-1');
  });

  test('interop: a plain nats.js JetStream consumer reads a Tidings message as a CloudEvent in binary mode', async (t) => {
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const b = ns.bus('interop');
    await b.start();
    const published = await b.publish(Ticked, { key: 'i', seq: 7 }, { subject: 'order 42 "quoted" 100%', tenant: 'acme' });
    const nc = await natsConnect({ servers: NATS_URL });
    try {
      const jsm = await nc.jetstreamManager();
      await jsm.consumers.add(ns.stream, { durable_name: 'plain', ack_policy: AckPolicy.Explicit, deliver_policy: DeliverPolicy.All });
      const consumer = await nc.jetstream().consumers.get(ns.stream, 'plain');
      const msg = await consumer.next({ expires: 5_000 });
      assert.ok(msg, 'the plain consumer got the message');
      assert.equal(msg.subject, `${ns.subjectPrefix}.${keyHash('i') % quickNats.buckets}.test.ticked`);
      assert.equal(msg.headers?.get('ce-specversion'), '1.0');
      assert.equal(msg.headers?.get('ce-id'), published.id);
      assert.equal(msg.headers?.get('ce-type'), 'test.ticked.v1');
      assert.equal(msg.headers?.get('ce-source'), 'tidings://interop');
      assert.equal(msg.headers?.get('ce-partitionkey'), 'i');
      assert.equal(msg.headers?.get('ce-tenant'), 'acme');
      assert.equal(msg.headers?.get('ce-subject'), 'order%2042%20%22quoted%22%20100%25', 'percent-encoded by the HTTP binding rule');
      assert.ok(!Number.isNaN(Date.parse(msg.headers!.get('ce-time'))));
      assert.equal(msg.headers?.get('content-type'), 'application/json');
      assert.equal(msg.headers?.get('Nats-Msg-Id'), published.id);
      assert.deepEqual(msg.json(), { key: 'i', seq: 7 });
      msg.ack();
    } finally {
      await nc.close();
    }
  });
  test("a delivery taken by a pull that is not the worker's is waited for: the key's later messages run after it comes back", async (t) => {
    // The shape of the bug this guards against: JetStream counts a message delivered, but it never reaches the
    // worker (here a stray pull request queued before the worker's takes it and never answers); the worker
    // receives the key's later messages first. It sees the jump in the consumer sequence and holds the bucket
    // until JetStream redelivers the missing one after ack_wait, then runs the key in stream order.
    const ns = await natsWorld(t);
    if (ns === undefined) return;
    const publisher = ns.bus('publisher', { buckets: 1 });
    await publisher.start(); // creates the stream
    const nc = await natsConnect({ servers: NATS_URL });
    t.after(() => nc.close());
    const jsm = await nc.jetstreamManager();
    const concurrency = 4;
    // The subscription's own durable consumer, declared as the worker would, so the stray pull can queue first.
    await jsm.consumers.add(ns.stream, {
      durable_name: 'held_0',
      ack_policy: AckPolicy.Explicit,
      filter_subject: `${ns.subjectPrefix}.0.>`,
      deliver_policy: DeliverPolicy.New,
      ack_wait: nanos(quickNats.ackWaitMs),
      max_ack_pending: concurrency * natsDefaults.ackPendingPerHandler,
      max_deliver: -1,
    });
    const stray: Msg[] = [];
    const inbox = createInbox();
    nc.subscribe(inbox, { callback: (_error, msg) => (msg.subject === inbox ? undefined : stray.push(msg)) });
    nc.publish(`$JS.API.CONSUMER.MSG.NEXT.${ns.stream}.held_0`, JSONCodec().encode({ batch: 1, expires: nanos(30_000) }), { reply: inbox });
    await nc.flush();

    const worker = ns.bus('worker', { buckets: 1 });
    const seen: Array<{ seq: number; attempt: number }> = [];
    worker.subscribe(
      'held',
      Ticked,
      (message, ctx) => {
        seen.push({ seq: message.data.seq, attempt: ctx.attempt });
      },
      { concurrency },
    );
    await worker.start();
    await waitFor('the worker holds the bucket and pulls', async () => (await jsm.consumers.info(ns.stream, 'held_0')).num_waiting >= 2);
    await publisher.publishMany(
      Ticked,
      [0, 1, 2, 3, 4].map((seq) => ({ key: 'k', seq })),
    );
    await waitFor('every message', () => seen.length >= 5, 15_000);
    assert.equal(stray.length, 1, 'the stray pull took one delivery');
    assert.equal(JSON.parse(new TextDecoder().decode(stray[0]!.data)).seq, 0, 'the first message of the key');
    assert.deepEqual(
      seen.map((s) => s.seq),
      [0, 1, 2, 3, 4],
      'in stream order although seq 0 came back last',
    );
    assert.equal(seen[0]!.attempt, 2, 'seq 0 is a redelivery');
  });
});
