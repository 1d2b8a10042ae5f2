/**
 * Hostile input on the NATS backbone: messages JetStream can never take, and messages from plain NATS
 * clients that Tidings cannot handle. Each poison is refused at publish or set aside once (a dead letter with
 * the reason), and every other message flows. Each test has its own stream and subject prefix.
 */
import assert from 'node:assert/strict';
import { after, describe, test, type TestContext } from 'node:test';
import { connect as natsConnect, headers as natsHeaders, type MsgHdrs } from 'nats';
import { createBus, deadLetter, keyHash, type Bus } from '../src/index.ts';
import { nats, type NatsOptions } from '../src/nats/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { NATS_URL, sleep, waitFor } from './helpers.ts';
import { natsNamespace, quickNats, type NatsNamespace } from './nats.helpers.ts';

const buses: Bus<PgTransaction>[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

function bus(options: NatsOptions, service = 'nats-input'): Bus<PgTransaction> {
  const created = createBus({ service, backbone: nats(options) });
  buses.push(created);
  return created;
}

async function world(t: TestContext): Promise<NatsNamespace | undefined> {
  const namespace = await natsNamespace(t, 'i');
  if (namespace !== undefined) cleanups.push(() => namespace.cleanup());
  return namespace;
}

/** The headers a foreign CloudEvents producer sends for a Ticked event of `key`. */
function cloudEventHeaders(id: string, key: string): MsgHdrs {
  const h = natsHeaders();
  for (const [name, value] of [['ce-specversion', '1.0'], ['ce-id', id], ['ce-source', 'tidings://foreign'], ['ce-type', 'test.ticked.v1'], ['ce-partitionkey', key]] as const) h.set(name, value);
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

describe('nats hostile input', () => {
  test('a subject without a bucket number, or with one past the last bucket, is refused at publish: nothing is stored where no consumer reads', async (t) => {
    const ns = await world(t);
    if (ns === undefined) return;
    const b = bus(ns.options());
    const seen: number[] = [];
    b.subscribe('strays', Ticked, (message) => {
      seen.push(message.data.seq);
    });
    await b.start();
    const stray = [`${ns.subjectPrefix}.${Ticked.topic}`, `${ns.subjectPrefix}.x.${Ticked.topic}`, `${ns.subjectPrefix}.${quickNats.buckets}.${Ticked.topic}`, `${ns.subjectPrefix}.0`];
    for (const subject of stray) {
      await assert.rejects(publishPlain(subject, '{"key":"s","seq":99}', cloudEventHeaders(`stray-${subject}`, 's')), /no responders|503/i, `JetStream refuses ${subject}`);
    }
    // The same event on its bucket's subject is stored and handled.
    await publishPlain(`${ns.subjectPrefix}.${keyHash('s') % quickNats.buckets}.${Ticked.topic}`, '{"key":"s","seq":1}', cloudEventHeaders('on-a-bucket', 's'));
    await waitFor('the message on a bucket subject', () => seen.includes(1));
    await sleep(300);
    assert.deepEqual(seen, [1]);
    assert.equal(await b.backbone.deadLetters().count({ all: true }), 0);
  });

  test('a payload nested 10,000 deep from a plain client is dead-lettered once with its raw bytes; its key\'s next message flows', async (t) => {
    const ns = await world(t);
    if (ns === undefined) return;
    const b = bus(ns.options());
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
    const ns = await world(t);
    if (ns === undefined) return;
    const b = bus(ns.options());
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
    assert.match(letter!.reason, /too large for this test \[dead letter kept without its payload, headers and stacks: over \d+ bytes; the message is in stream .* at sequence 1\]/);
    assert.equal('data' in letter!.envelope, false);
    refuse = false;
    assert.equal((await store.redrive({ ids: ['large-1'] })).count, 1);
    await waitFor('the redriven message', () => seen.includes('L:1'));
  });

  test('a stream made when the stream took every subject under the prefix is narrowed to its buckets on open', async (t) => {
    const ns = await world(t);
    if (ns === undefined) return;
    const nc = await natsConnect({ servers: NATS_URL });
    try {
      const jsm = await nc.jetstreamManager();
      await jsm.streams.add({ name: ns.stream, subjects: [`${ns.subjectPrefix}.>`], description: `tidings buckets=${quickNats.buckets}: Tidings messages, subjects ${ns.subjectPrefix}.<bucket>.<topic>` });
      const b = bus(ns.options());
      await b.start();
      const info = await jsm.streams.info(ns.stream);
      assert.deepEqual(info.config.subjects, Array.from({ length: quickNats.buckets }, (_, i) => `${ns.subjectPrefix}.${i}.>`));
      await assert.rejects(createBus({ service: 'other-prefix', backbone: nats(ns.options({ subjectPrefix: 'elsewhere' })) }).start(), /carries subjects .*Use subjectPrefix/);
    } finally {
      await nc.close();
    }
  });
});
