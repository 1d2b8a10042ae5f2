/**
 * Hostile input on the NATS backbone: messages JetStream can never take, and messages from plain NATS
 * clients that Tidings cannot handle. Each poison is refused at publish or set aside once (a dead letter with
 * the reason), and every other message flows. Each test has its own stream and subject prefix.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { connect as natsConnect, headers as natsHeaders, type MsgHdrs } from 'nats';
import { createBus, deadLetter, keyHash, TidingsError } from '../src/index.ts';
import type { Outgoing } from '../src/core/backbone.ts';
import type { Envelope } from '../src/core/envelope.ts';
import { nats, NatsBroker } from '../src/nats/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { foreignTick, Ticked, ticksSeen } from './fixtures/contracts.ts';
import { DATABASE_URL, dropSchema, NATS_URL, requirePostgres, sleep, uniqueSchema, waitFor } from './helpers.ts';
import { natsWorld, quickNats } from './fixtures/nats.ts';

/** The headers a foreign CloudEvents producer sends for a Ticked event of `key`. */
function cloudEventHeaders(id: string, key: string): MsgHdrs {
  const h = natsHeaders();
  for (const [name, value] of [
    ['ce-specversion', '1.0'],
    ['ce-id', id],
    ['ce-source', 'tidings://foreign'],
    ['ce-type', 'test.ticked.v1'],
    ['ce-partitionkey', key],
  ] as const)
    h.set(name, value);
  return h;
}

/** Publishes with a plain nats.js JetStream client, as a foreign producer would. */
async function publishPlain(subject: string, payload: string, headers?: MsgHdrs): Promise<void> {
  const nc = await natsConnect({ servers: NATS_URL });
  try {
    await nc.jetstream().publish(subject, Buffer.from(payload), { headers, timeout: 2_000 });
  } finally {
    await nc.close();
  }
}

function outgoing(overrides: Partial<Envelope>, data: unknown = { key: 'k', seq: 1 }): Outgoing {
  const envelope = foreignTick('k', data, overrides);
  return { envelope, json: JSON.stringify(data), keyHash: keyHash(envelope.partitionkey) };
}

describe('nats hostile input', () => {
  test('a message NATS can never take fails at once in publish, not retryable, naming the limit, the id and the topic; the connection stays up', async (t) => {
    const ns = await natsWorld(t, 'i');
    if (ns === undefined) return;
    const broker = new NatsBroker(ns.options());
    t.after(() => broker.close());
    await broker.open();
    const poisons: Array<[string, Outgoing, string, RegExp]> = [
      [
        'a message over max_payload',
        outgoing({ id: 'big' }, { key: 'k', seq: 1, note: 'x'.repeat(1_100_000) }),
        'LIMIT_EXCEEDED',
        /message big \(test\.ticked\): it is \d+ bytes with its headers, over the server's max_payload of 1048576/,
      ],
      [
        'headers over 64 KiB (a 70 kB key)',
        outgoing({ id: 'long-key', partitionkey: 'k'.repeat(70_000) }),
        'LIMIT_EXCEEDED',
        /message long-key \(test\.ticked\): its headers are \d+ bytes, over JetStream's limit of 65535/,
      ],
      [
        'a 1 MB key',
        outgoing({ id: 'huge-key', partitionkey: 'k'.repeat(1_000_000) }),
        'LIMIT_EXCEEDED',
        /its headers are \d+ bytes, over JetStream's limit of 65535/,
      ],
      [
        'a lone surrogate in the key',
        outgoing({ id: 'surrogate', partitionkey: 'a\ud800b' }),
        'INVALID_PAYLOAD',
        /message surrogate \(test\.ticked\): its partitionkey holds a lone surrogate/,
      ],
      ['a lone surrogate in the id', outgoing({ id: 'x\udc00' }), 'INVALID_PAYLOAD', /its id holds a lone surrogate/],
      [
        'a topic of 5,000 bytes',
        outgoing({ id: 'long-topic', topic: 't'.repeat(5_000) }),
        'LIMIT_EXCEEDED',
        /message long-topic \(t+\): its subject is \d+ bytes, over the limit of 3840/,
      ],
      [
        'a topic with a space',
        outgoing({ id: 'spaced', topic: 'a b' }),
        'INVALID_PAYLOAD',
        /message spaced \(a b\): its subject .* is not NATS subject tokens/,
      ],
    ];
    for (const [what, message, code, pattern] of poisons) {
      const began = Date.now();
      const error = await broker.publish([message]).then(
        () => undefined,
        (e: unknown) => e,
      );
      assert.ok(error instanceof TidingsError, `${what}: a TidingsError (got ${String(error)})`);
      assert.equal(error.code, code, `${what}: ${error.message}`);
      assert.equal(error.retryable, false, `${what}: not retryable`);
      assert.match(error.message, pattern, what);
      assert.equal(error.ref?.id, message.envelope.id, `${what}: the id in ref`);
      assert.equal(error.ref?.topic, message.envelope.topic, `${what}: the topic in ref`);
      assert.ok(Date.now() - began < 1_000, `${what}: at once (${Date.now() - began} ms)`);
    }
    // Nothing of a refused batch is sent; the connection is still up for the next publish.
    await assert.rejects(broker.publish([outgoing({ id: 'fine-1' }), poisons[0]![1]]), /max_payload/);
    const fine = outgoing({ id: 'line\r\nbreak' }); // a header value cannot hold a line break: percent-encoded
    await broker.publish([fine]);
    const nc = await natsConnect({ servers: NATS_URL });
    try {
      const info = await (await nc.jetstreamManager()).streams.info(ns.stream);
      assert.equal(info.state.messages, 1, 'only the message NATS can take was stored');
    } finally {
      await nc.close();
    }
  });

  test("through the outbox relay: a message NATS refuses is set aside in the outbox's dead letters, the messages behind it flow", async (t) => {
    const ns = await natsWorld(t, 'i');
    if (ns === undefined || !(await requirePostgres(t))) return;
    const schema = uniqueSchema('natsin');
    const outbox = postgres({ url: DATABASE_URL, schema, leaseMs: 2_000, heartbeatMs: 500, pollMs: 500 });
    // The bus lets 2 MB through; the NATS server (max_payload 1 MiB) never will.
    const b = createBus({ service: 'nats-input', maxPayloadBytes: 2_000_000, backbone: nats(ns.options({ outbox })) });
    t.after(async () => {
      await b.stop().catch(() => undefined);
      await dropSchema(schema);
    });
    const seen = await ticksSeen(b, 'relayed');
    await b.transaction(async (tx) => {
      await b.publish(Ticked, { key: 'r', seq: 1 }, { tx });
      await b.publish(Ticked, { key: 'r', seq: 2, note: 'x'.repeat(1_200_000) }, { tx });
      await b.publish(Ticked, { key: 'r', seq: 3 }, { tx });
    });
    await b.transaction((tx) => b.publish(Ticked, { key: 'other', seq: 4 }, { tx }));
    await waitFor('the messages around the refused one', () => seen.includes(3) && seen.includes(4), 15_000);
    assert.deepEqual(seen.sort(), [1, 3, 4]);
    await waitFor('the refused message set aside', async () => (await outbox.deadLetters().count({ subscription: 'tidings-relay' })) === 1);
    const setAside = await outbox.deadLetters().list({ subscription: 'tidings-relay' });
    assert.match(setAside.deadLetters[0]!.reason, /nats refused message .* for good: NATS cannot take message .*max_payload of 1048576/);
  });

  test('a subject without a bucket number, or with one past the last bucket, is refused at publish: nothing is stored where no consumer reads', async (t) => {
    const ns = await natsWorld(t, 'i');
    if (ns === undefined) return;
    const b = ns.bus('nats-input');
    const seen = await ticksSeen(b, 'strays');
    const stray = [
      `${ns.subjectPrefix}.${Ticked.topic}`,
      `${ns.subjectPrefix}.x.${Ticked.topic}`,
      `${ns.subjectPrefix}.${quickNats.buckets}.${Ticked.topic}`,
      `${ns.subjectPrefix}.0`,
    ];
    for (const subject of stray) {
      await assert.rejects(
        publishPlain(subject, '{"key":"s","seq":99}', cloudEventHeaders(`stray-${subject}`, 's')),
        /no responders|503/i,
        `JetStream refuses ${subject}`,
      );
    }
    // The same event on its bucket's subject is stored and handled.
    await publishPlain(`${ns.subjectPrefix}.${keyHash('s') % quickNats.buckets}.${Ticked.topic}`, '{"key":"s","seq":1}', cloudEventHeaders('on-a-bucket', 's'));
    await waitFor('the message on a bucket subject', () => seen.includes(1));
    await sleep(300);
    assert.deepEqual(seen, [1]);
    assert.equal(await b.backbone.deadLetters().count({ all: true }), 0);
  });

  test("a payload nested 10,000 deep from a plain client is dead-lettered once with its raw bytes; its key's next message flows", async (t) => {
    const ns = await natsWorld(t, 'i');
    if (ns === undefined) return;
    const b = ns.bus('nats-input');
    const seen: string[] = [];
    b.subscribe('deep', Ticked, (message) => {
      seen.push(`${message.data.key}:${message.data.seq}`);
    });
    await b.start();
    const subject = `${ns.subjectPrefix}.${keyHash('d') % quickNats.buckets}.${Ticked.topic}`;
    const deep = '['.repeat(10_000) + ']'.repeat(10_000);
    assert.throws(() => JSON.stringify(JSON.parse(deep)), RangeError, 'JSON.stringify cannot write it back');
    await publishPlain(subject, deep, cloudEventHeaders('deep-1', 'd'));
    await publishPlain(subject, '{"key":"d","seq":2}', cloudEventHeaders('after-deep', 'd'));
    await waitFor('the next message of the key', () => seen.includes('d:2'), 10_000);
    const store = b.backbone.deadLetters();
    await waitFor('the dead letter', async () => (await store.count({ subscription: 'deep' })) === 1);
    await sleep(1_000); // a retried dead letter would be written again within errorBackoffMs
    assert.equal(await store.count({ all: true }), 1, 'written once');
    const [letter] = await store.show('deep-1');
    assert.equal(letter!.key, 'd');
    assert.match(letter!.reason, /invalid payload|nested|deep/i);
    assert.equal(letter!.envelope.data, deep, 'the payload kept as the text that came, since it cannot be written as JSON');
  });

  test('a dead letter too large to keep whole points at the message in its stream; a redrive reads it from there', async (t) => {
    const ns = await natsWorld(t, 'i');
    if (ns === undefined) return;
    const b = ns.bus('nats-input');
    let refuse = true;
    const seen: string[] = [];
    b.subscribe('large', Ticked, (message) => {
      if (refuse && message.data.note !== undefined) return deadLetter('too large for this test');
      seen.push(`${message.data.key}:${message.data.seq}`);
    });
    await b.start();
    // Just under the server's max_payload (1 MiB) with its headers: stored, but its dead letter cannot hold it.
    const note = 'n'.repeat(1_046_000);
    const subject = `${ns.subjectPrefix}.${keyHash('L') % quickNats.buckets}.${Ticked.topic}`;
    await publishPlain(subject, JSON.stringify({ key: 'L', seq: 1, note }), cloudEventHeaders('large-1', 'L'));
    await publishPlain(subject, '{"key":"L","seq":2}', cloudEventHeaders('large-2', 'L'));
    await waitFor('the next message of the key', () => seen.includes('L:2'), 10_000);
    const store = b.backbone.deadLetters();
    await waitFor('the dead letter', async () => (await store.count({ subscription: 'large' })) === 1);
    const [letter] = await store.show('large-1');
    assert.match(
      letter!.reason,
      /too large for this test \[dead letter kept without its payload, headers and stacks: over \d+ bytes; the message is in stream .* at sequence 1\]/,
    );
    assert.equal('data' in letter!.envelope, false);
    refuse = false;
    assert.equal((await store.redrive({ ids: ['large-1'] })).count, 1);
    await waitFor('the redriven message', () => seen.includes('L:1'));
  });

  test('a stream made when the stream took every subject under the prefix is narrowed to its buckets on open', async (t) => {
    const ns = await natsWorld(t, 'i');
    if (ns === undefined) return;
    const nc = await natsConnect({ servers: NATS_URL });
    try {
      const jsm = await nc.jetstreamManager();
      await jsm.streams.add({
        name: ns.stream,
        subjects: [`${ns.subjectPrefix}.>`],
        description: `tidings buckets=${quickNats.buckets}: Tidings messages, subjects ${ns.subjectPrefix}.<bucket>.<topic>`,
      });
      const b = ns.bus('nats-input');
      await b.start();
      const info = await jsm.streams.info(ns.stream);
      assert.deepEqual(
        info.config.subjects,
        Array.from({ length: quickNats.buckets }, (_, i) => `${ns.subjectPrefix}.${i}.>`),
      );
      await assert.rejects(
        createBus({ service: 'other-prefix', backbone: nats(ns.options({ subjectPrefix: 'elsewhere' })) }).start(),
        /carries subjects .*Use subjectPrefix/,
      );
    } finally {
      await nc.close();
    }
  });
});
