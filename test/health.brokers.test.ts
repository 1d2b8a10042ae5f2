/**
 * `bus.health()` on the brokers: RabbitMQ and NATS report whether the server answers; with an outbox, the
 * outbox's database and notifier are checked too, and a relay that is behind makes the bus unready (with the
 * reason) until it has caught up.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { createBus, type Bus } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { quickPostgres } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { natsNamespace } from './fixtures/nats.ts';
import { deleteByPrefix } from './fixtures/rabbitmq.ts';
import { DATABASE_URL, dropSchema, RABBITMQ_URL, requireBroker, requirePostgres, uniqueSchema, waitFor } from './helpers.ts';

const buses: Bus<PgTransaction>[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

test('RabbitMQ with an outbox: broker, database and notifier checked; unready while the relay is behind, ready once it caught up', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL)) || !(await requirePostgres(t))) return;
  const schema = uniqueSchema('hb');
  const prefix = `health_${process.pid}_${Math.random().toString(36).slice(2, 8)}.`;
  cleanups.push(
    () => deleteByPrefix(prefix),
    () => dropSchema(schema),
  );
  const bus = createBus({
    service: 'probed',
    backbone: rabbitmq({ url: RABBITMQ_URL, prefix, onWarning: () => undefined, outbox: postgres({ url: DATABASE_URL, schema, ...quickPostgres }) }),
  });
  buses.push(bus);
  await bus.start();
  // The status behind the relay check is read at most every few seconds (telemetryDefaults.statusCacheMs):
  // this first read comes right after the commit.
  await bus.transaction((tx) =>
    bus.publishMany(
      Ticked,
      Array.from({ length: 5_000 }, (_, seq) => ({ key: `k${seq % 50}`, seq })),
      { tx },
    ),
  );
  const behind = await bus.health({ relayMaxAgeMs: 0 });
  assert.deepEqual(
    behind.checks.map((check) => [check.name, check.ok]),
    [
      ['bus', true],
      ['broker', true],
      ['database', true],
      ['notifier', true],
      ['relay', false],
    ],
  );
  assert.equal(behind.ready, false);
  assert.equal(behind.live, true);
  assert.match(behind.reasons.join('\n'), /^relay: the relay is behind: \d+ message\(s\) wait/m);
  await waitFor('the relay caught up', async () => (await bus.health({ relayMaxAgeMs: 0 })).ready, 60_000);
});

test('NATS: the broker check answers while the server does', async (t) => {
  const namespace = await natsNamespace(t, 'health');
  if (namespace === undefined) return;
  cleanups.push(() => namespace.cleanup());
  const bus = createBus({ service: 'probed', backbone: nats(namespace.options()) });
  buses.push(bus as unknown as Bus<PgTransaction>);
  await bus.start();
  const health = await bus.health();
  assert.equal(health.ready, true, JSON.stringify(health));
  assert.deepEqual(
    health.checks.map((check) => [check.name, check.ok]),
    [
      ['bus', true],
      ['broker', true],
    ],
  );
});
