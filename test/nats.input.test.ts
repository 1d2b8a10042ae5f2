/**
 * Hostile input on the NATS backbone: messages JetStream can never take, and messages from plain NATS
 * clients that Tidings cannot handle. Each poison is refused at publish or set aside once (a dead letter with
 * the reason), and every other message flows. Each test has its own stream and subject prefix.
 */
import assert from 'node:assert/strict';
import { after, describe, test, type TestContext } from 'node:test';
import { connect as natsConnect, headers as natsHeaders, type MsgHdrs } from 'nats';
import { createBus, keyHash, type Bus } from '../src/index.ts';
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
