/**
 * A backbone per tenant on the brokers (tidings/stamps): a RabbitMQ vhost per tenant and a NATS subject prefix
 * (and stream) per tenant. Isolation is checked by an observer that is not the stamps: a plain bus on each
 * tenant's vhost or prefix sees that tenant's messages only, each once; handlers see each message once, in key
 * order; a vhost that does not exist yet holds up its tenant alone.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { createBus, type Backbone, type Bus, type TidingsError } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { tenantStamps } from '../src/stamps/index.ts';
import { natsNamespace, type NatsNamespace } from './fixtures/nats.ts';
import { testOptions } from './fixtures/rabbitmq.ts';
import { RABBITMQ_URL, requireBroker, uniqueSchema, waitFor } from './helpers.ts';
import { Placed } from './fixtures/stamps.ts';

const run = promisify(execFile);

const TENANTS = ['acme', 'globex'];
const KEYS = 4;
const PER_KEY = 10;

/** What a bus saw: tenant -> key -> seqs, and every message id. */
interface Seen {
  readonly byKey: Map<string, number[]>;
  readonly ids: string[];
}

function watch(bus: Bus<PgTransaction>, subscription: string): Seen {
  const seen: Seen = { byKey: new Map(), ids: [] };
  bus.subscribe(subscription, Placed, (message) => {
    const key = `${message.tenant}/${message.data.key}`;
    seen.byKey.set(key, [...(seen.byKey.get(key) ?? []), message.data.seq]);
    seen.ids.push(message.id);
  });
  return seen;
}

/** Publishes KEYS x PER_KEY messages for each tenant, keys interleaved, tenants at once. */
async function publishAll(bus: Bus<PgTransaction>): Promise<void> {
  await Promise.all(
    TENANTS.map(async (tenant) => {
      for (let seq = 0; seq < PER_KEY; seq++) {
        for (let k = 0; k < KEYS; k++) await bus.withTenant(tenant, () => bus.publish(Placed, { key: `k${k}`, seq }));
      }
    }),
  );
}

/** Each tenant's keys in order, each message once; `only` limits the tenants expected. */
function assertSeen(seen: Seen, only: readonly string[], what: string): void {
  assert.equal(seen.ids.length, only.length * KEYS * PER_KEY, `${what}: every message once`);
  assert.equal(new Set(seen.ids).size, seen.ids.length, `${what}: no message twice`);
  const expected = new Map(only.flatMap((tenant) => Array.from({ length: KEYS }, (_, k) => [`${tenant}/k${k}`, Array.from({ length: PER_KEY }, (_, s) => s)])));
  assert.deepEqual(new Map([...seen.byKey].sort()), new Map([...expected].sort()), `${what}: its tenants' keys, in order`);
}

/**
 * The stamps on `backboneOf`, a bus on them that handles, one that publishes, and beside them a plain bus per
 * tenant on that tenant's own backbone (the observer); all stopped when the test ends.
 */
async function isolation(backboneOf: (tenant: string) => Backbone<PgTransaction>): Promise<void> {
  const consumer = createBus({ service: 'billing', backbone: tenantStamps({ tenants: TENANTS, backbone: backboneOf }) });
  const publisher = createBus({ service: 'orders', backbone: tenantStamps({ tenants: TENANTS, backbone: backboneOf }) });
  const buses = [consumer, publisher];
  try {
    const handled = watch(consumer, 'billing');
    const observers = TENANTS.map((tenant) => {
      const bus = createBus({ service: `audit-${tenant}`, backbone: backboneOf(tenant) });
      buses.push(bus);
      return { tenant, seen: watch(bus, 'audit') };
    });
    for (const bus of buses) await bus.start();
    await publishAll(publisher);
    const total = TENANTS.length * KEYS * PER_KEY;
    await waitFor('every message handled and observed', () => handled.ids.length >= total && observers.every((o) => o.seen.ids.length >= KEYS * PER_KEY));
    // Anything late (a message where it does not belong, a duplicate) would show in the counts below.
    await new Promise((resolve) => setTimeout(resolve, 500));
    assertSeen(handled, TENANTS, 'the stamps');
    for (const { tenant, seen } of observers) assertSeen(seen, [tenant], `${tenant}'s own backbone`);
  } finally {
    for (const bus of buses) await bus.stop().catch(() => undefined);
  }
}

test('RabbitMQ: a vhost per tenant; each vhost carries its tenant only; a vhost that does not exist yet holds up its tenant alone', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return;
  const id = uniqueSchema('stamp');
  const vhostOf = (tenant: string) => `${id}_${tenant}`;
  const vhosts: string[] = [];
  // rabbitmqctl takes its time on a loaded machine (over a minute for add_vhost was seen): give it three.
  const ctl = (...args: string[]) => run('rabbitmqctl', args, { timeout: 180_000 });
  const addVhost = async (vhost: string) => {
    vhosts.push(vhost);
    await ctl('add_vhost', vhost);
    await ctl('set_permissions', '-p', vhost, 'guest', '.*', '.*', '.*');
  };
  t.after(async () => {
    for (const vhost of vhosts) await ctl('delete_vhost', vhost).catch(() => undefined);
  });
  for (const tenant of TENANTS) await addVhost(vhostOf(tenant));
  const backboneOf = (tenant: string) =>
    rabbitmq({ ...testOptions('tidings.', `tidings-stamp-${id}`), url: `${RABBITMQ_URL}/${encodeURIComponent(vhostOf(tenant))}`, connectTimeoutMs: 2_000 });
  await isolation(backboneOf);
  for (const tenant of TENANTS) {
    const { stdout: queues } = await ctl('-q', 'list_queues', '-p', vhostOf(tenant), 'name');
    assert.match(queues, /tidings\./, `${tenant}'s vhost has its own queues`);
  }

  // A tenant whose vhost is not there yet: the others publish and handle; it joins once the vhost exists.
  const warnings: string[] = [];
  const late = [...TENANTS, 'initech'];
  const bus = createBus({
    service: 'late',
    backbone: tenantStamps({ tenants: late, backbone: backboneOf, reopenMs: 300, onWarning: (m) => warnings.push(m) }),
  });
  const handled: string[] = [];
  bus.subscribe('late', Placed, (message) => {
    handled.push(`${message.tenant}:${message.data.seq}`);
  });
  try {
    await bus.start();
    assert.match(warnings[0] ?? '', /stamp of tenant initech could not open/);
    await bus.publish(Placed, { key: 'k', seq: 1 }, { tenant: 'acme' });
    await assert.rejects(bus.publish(Placed, { key: 'k', seq: 2 }, { tenant: 'initech' }), (error: TidingsError) => error.code === 'BACKBONE_UNAVAILABLE');
    await waitFor("acme's message", () => handled.includes('acme:1'));
    await addVhost(vhostOf('initech'));
    await waitFor('initech to open', async () => (await bus.health()).checks.every((check) => !check.detail.startsWith('failing')), 15_000);
    await bus.publish(Placed, { key: 'k', seq: 3 }, { tenant: 'initech' });
    await waitFor("initech's message", () => handled.includes('initech:3'));
    assert.deepEqual(handled.sort(), ['acme:1', 'initech:3']);
  } finally {
    await bus.stop();
  }
});

test('NATS: a subject prefix (and stream) per tenant; each carries its tenant only', async (t) => {
  const namespaces = new Map<string, NatsNamespace>();
  for (const tenant of TENANTS) {
    const namespace = await natsNamespace(t, `stamp_${tenant}`);
    if (namespace === undefined) return;
    namespaces.set(tenant, namespace);
  }
  t.after(async () => {
    for (const namespace of namespaces.values()) await namespace.cleanup().catch(() => undefined);
  });
  await isolation((tenant) => nats(namespaces.get(tenant)!.options()));
});
