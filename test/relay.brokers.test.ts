/**
 * The outbox relay on each broker, under a crash: a process relaying the outbox to the broker is killed
 * with -9 mid-stream; another process's relay takes its partitions over when the lease expires and hands
 * over again what the dead one had not acknowledged. The consumer counts: every message once (the inbox
 * removes what was relayed twice), each key in order.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { after, test, type TestContext } from 'node:test';
import { createBus, type Bus } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { postgresSchema, quickPostgres } from './conformance/postgres.ts';
import { Ticked } from './fixtures/contracts.ts';
import { DATABASE_URL, dropSchema, NATS_URL, RABBITMQ_URL, requireBroker, waitFor } from './helpers.ts';
import { natsNamespace, quickNats } from './fixtures/nats.ts';
import { deleteByPrefix } from './fixtures/rabbitmq.ts';

const buses: Bus<PgTransaction>[] = [];
const children: ChildProcess[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  for (const child of children) child.kill('SIGKILL');
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

interface Broker {
  name: 'rabbitmq' | 'nats';
  /** Options of rabbitmq() or nats() for this test's namespace, as JSON for the relay process too. */
  options: { url?: string; servers?: string } & Record<string, unknown>;
}

async function rabbitBroker(t: TestContext): Promise<Broker | undefined> {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return undefined;
  const prefix = `relay_${process.pid}_${Math.random().toString(36).slice(2, 8)}.`;
  cleanups.push(() => deleteByPrefix(prefix));
  return { name: 'rabbitmq', options: { url: RABBITMQ_URL, prefix, reconnectMinMs: 50, reconnectMaxMs: 500 } };
}

async function natsBroker(t: TestContext): Promise<Broker | undefined> {
  const namespace = await natsNamespace(t, 'relay');
  if (namespace === undefined) return undefined;
  cleanups.push(() => namespace.cleanup());
  const { onWarning: _, ...quick } = quickNats;
  return { name: 'nats', options: { servers: NATS_URL, stream: namespace.stream, subjectPrefix: namespace.subjectPrefix, ...quick } };
}

function startRelay(broker: Broker, schema: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/relay.ts'], {
    env: { ...process.env, DATABASE_URL, SCHEMA: schema, BROKER: broker.name, BROKER_ARGS: JSON.stringify(broker.options) },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  children.push(child);
  return new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`relay exited with ${code} before it was ready`)));
    child.stdout!.on('data', (chunk: Buffer) => {
      if (chunk.toString().includes('ready')) {
        child.removeAllListeners('exit');
        resolve(child);
      }
    });
  });
}

for (const [label, make] of [
  ['RabbitMQ', rabbitBroker],
  ['NATS', natsBroker],
] as const) {
  test(`${label}: a relay killed with -9 mid-stream; another takes over; every message arrives once, in per-key order`, async (t) => {
    const broker = await make(t);
    if (broker === undefined) return;
    const world = await postgresSchema(t, 'rl');
    if (world === undefined) return;
    cleanups.push(() => dropSchema(world.schema));
    const backbone = () => {
      const outbox = postgres({ url: DATABASE_URL, schema: world.schema, ...quickPostgres });
      const options = { ...broker.options, outbox, relay: false, onWarning: () => undefined };
      return broker.name === 'rabbitmq' ? rabbitmq(options as Parameters<typeof rabbitmq>[0]) : nats(options as Parameters<typeof nats>[0]);
    };
    // The consumer first: a broker keeps messages only for subscriptions that exist.
    const consumer = createBus({ service: 'consumer', backbone: backbone() });
    buses.push(consumer);
    consumer.subscribe('relayed', Ticked, (message, ctx) => world.effects.write(ctx.tx, message));
    await consumer.start();

    const publisher = createBus({ service: 'publisher', backbone: backbone() });
    buses.push(publisher);
    await publisher.start();
    const keys = 50;
    const perKey = 40;
    for (let seq = 0; seq < perKey; seq++) {
      await publisher.transaction((tx) =>
        publisher.publishMany(
          Ticked,
          Array.from({ length: keys }, (_, k) => ({ key: `k${k}`, seq })),
          { tx },
        ),
      );
    }
    const total = keys * perKey;

    const doomed = await startRelay(broker, world.schema);
    await waitFor('the first relay under way', async () => (await world.effects.rows()).length >= 200, 30_000);
    doomed.kill('SIGKILL');
    const atKill = (await world.effects.rows()).length;
    const heir = await startRelay(broker, world.schema);
    await waitFor(`all ${total} effects`, async () => new Set((await world.effects.rows()).map((row) => row.messageId)).size >= total, 60_000);
    heir.kill('SIGKILL');
    const rows = await world.effects.rows();
    t.diagnostic(`killed at ${atKill} of ${total}; ${rows.length} effects after the take-over`);
    assert.ok(atKill < total, 'the relay was killed mid-stream');
    assert.equal(rows.length, total, 'every message handled once: relayed twice is de-duplicated');
    const byKey = new Map<string, number[]>();
    for (const row of rows) byKey.set(row.key, [...(byKey.get(row.key) ?? []), row.seq]);
    for (const [key, seqs] of byKey)
      assert.deepEqual(
        seqs,
        Array.from({ length: perKey }, (_, i) => i),
        `order of ${key}`,
      );
  });
}
