/**
 * The NATS JetStream backbone end to end through createBus, against the real server (NATS_URL) and, for
 * the outbox, PostgreSQL (DATABASE_URL). Each test has its own stream and subject prefix.
 */
import assert from 'node:assert/strict';
import { after, describe, test, type TestContext } from 'node:test';
import { connect as natsConnect, headers as natsHeaders, AckPolicy, DeliverPolicy, type NatsConnection } from 'nats';
import { createBus, newId, type Bus } from '../src/index.ts';
import { nats, natsDefaults, type NatsOptions } from '../src/nats/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { DATABASE_URL, dropSchema, NATS_URL, requirePostgres, sleep, uniqueSchema, waitFor } from './helpers.ts';
import { natsNamespace, type NatsNamespace } from './nats.helpers.ts';

const buses: Bus<PgTransaction>[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

function bus(options: NatsOptions, service = 'nats-test'): Bus<PgTransaction> {
  const created = createBus({ service, backbone: nats(options) });
  buses.push(created);
  return created;
}

async function stopBus(b: Bus<PgTransaction>): Promise<void> {
  buses.splice(buses.indexOf(b), 1);
  await b.stop();
}

async function world(t: TestContext): Promise<NatsNamespace | undefined> {
  const namespace = await natsNamespace(t);
  if (namespace !== undefined) cleanups.push(() => namespace.cleanup());
  return namespace;
}

describe('nats backbone', () => {
  test('publish and subscribe; options are validated by name', async (t) => {
    assert.throws(() => nats({ servers: NATS_URL, buckets: 0, leaseMs: 10 }), /buckets must be an integer from 1 to 1024.*leaseMs/);
    assert.throws(() => nats({ servers: NATS_URL, leaseMs: 5_000 }), /leaseMs \(5000\) must exceed ackWaitMs \+ heartbeatMs/);
    assert.equal(natsDefaults.stream, 'TIDINGS');
    const ns = await world(t);
    if (ns === undefined) return;
    const b = bus(ns.options());
    const seen: number[] = [];
    b.subscribe('smoke', Ticked, (message) => {
      seen.push(message.data.seq);
    });
    await b.start();
    await b.publish(Ticked, { key: 'a', seq: 1 });
    await b.publishMany(Ticked, [{ key: 'a', seq: 2 }, { key: 'b', seq: 3 }]);
    await waitFor('three messages', () => seen.length === 3);
    assert.deepEqual(seen.sort(), [1, 2, 3]);
  });
});
