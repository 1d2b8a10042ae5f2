/**
 * The contracts registry on PostgreSQL (migration 011, src/postgres/registry.ts): services record
 * themselves when they start, a restart replaces the record, and the CLI builds the system's AsyncAPI
 * document from the database alone (`tidings asyncapi --system`, `--service`, `--check`) and checks code
 * against it (`tidings contracts check --against registry`). Every document is parsed by @asyncapi/parser.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { z } from 'zod';
import { createBus, defineCommand, defineEvent, type Bus } from '../src/index.ts';
import { postgres, readServices, type PgTransaction } from '../src/postgres/index.ts';
import { parseAsyncApi } from './fixtures/asyncapi.ts';
import { quickPostgres } from './fixtures/bus.ts';
import { connect, DATABASE_URL, dropSchema, requirePostgres, runTidings, uniqueSchema } from './helpers.ts';

const Placed = defineEvent('orders.order-placed', {
  schema: z.object({ orderId: z.string(), amountCents: z.number().int(), status: z.enum(['new', 'paid', 'cancelled']) }),
  key: (order) => order.orderId,
  description: 'A customer placed an order',
});
const PlacedV2 = defineEvent('orders.order-placed', {
  version: 2,
  schema: z.object({ orderId: z.string(), amountCents: z.number().int(), status: z.enum(['new', 'paid']) }),
  key: (order) => order.orderId,
  upcast: {
    1: (v1: { orderId: string; amountCents: number; status: string }) => ({ ...v1, status: v1.status === 'paid' ? ('paid' as const) : ('new' as const) }),
  },
});
const Charge = defineCommand('payments.charge', { schema: z.object({ orderId: z.string() }), reply: z.object({ ok: z.boolean() }) });

const schemas: string[] = [];
const buses: Bus<PgTransaction>[] = [];
const dir = mkdtempSync(join(tmpdir(), 'tidings-asyncapi-'));
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const schema of schemas) await dropSchema(schema);
  rmSync(dir, { recursive: true, force: true });
});

function bus(schema: string, service: string, publishes: Parameters<typeof createBus>[0]['publishes'] = []): Bus<PgTransaction> {
  const created = createBus({ service, backbone: postgres({ url: DATABASE_URL, schema, ...quickPostgres }), publishes });
  buses.push(created);
  return created;
}

const cli = (schema: string, args: string[]) => runTidings(['--schema', schema, ...args], { ...process.env, DATABASE_URL });

test('services record their contracts when they start; the CLI documents the system from the registry alone, and --check diffs it', async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('asyncapi');
  schemas.push(schema);
  const orders = bus(schema, 'orders', [Placed, Charge]);
  const billing = bus(schema, 'billing');
  billing.subscribe('billing.on-order', Placed, () => undefined, { partitions: 2 });
  const payments = bus(schema, 'payments');
  payments.subscribe('payments', Charge, () => ({ ok: true }));
  for (const each of [orders, billing, payments]) await each.start();

  const client = await connect();
  const services = await readServices(client, schema).finally(() => client.end());
  assert.deepEqual(
    services.map((service) => service.service),
    ['billing', 'orders', 'payments'],
  );
  const recordedBilling = services.find((service) => service.service === 'billing')!;
  assert.deepEqual(recordedBilling.backbone, { name: 'postgres', settings: { schema } });
  assert.equal(recordedBilling.subscriptions[0]!.partitions, 2);

  const system = await cli(schema, ['asyncapi', '--system']);
  assert.equal(system.code, 0, system.stderr);
  const document = JSON.parse(system.stdout);
  assert.deepEqual(Object.keys(document.operations), [
    'billing.billing.on-order.receive.orders.order-placed',
    'orders.send.orders.order-placed',
    'orders.send.payments.charge',
    'payments.payments.receive.payments.charge',
  ]);
  assert.equal(document.operations['billing.billing.on-order.receive.orders.order-placed']['x-tidings-dead-letters'].where, `table ${schema}.dead_letters`);
  await parseAsyncApi(document);
  const one = await cli(schema, ['asyncapi', '--service', 'payments']);
  assert.equal(one.code, 0, one.stderr);
  assert.deepEqual(Object.keys(JSON.parse(one.stdout).operations), ['payments.payments.receive.payments.charge']);
  await parseAsyncApi(one.stdout);

  const committed = join(dir, `${schema}.json`);
  assert.equal((await cli(schema, ['asyncapi', '--out', committed])).code, 0);
  const same = await cli(schema, ['asyncapi', '--check', committed]);
  assert.equal(same.code, 0, same.stderr);

  // billing is deployed again, reading version 2: its record is replaced, and the committed document is stale.
  await billing.stop();
  const billing2 = bus(schema, 'billing');
  billing2.subscribe('billing.on-order', PlacedV2, () => undefined, { partitions: 2 });
  await billing2.start();
  const stale = await cli(schema, ['asyncapi', '--check', committed]);
  assert.equal(stale.code, 1);
  assert.match(stale.stderr, /\+ \/channels\/orders\.order-placed\/messages\/orders\.order-placed\.v2: /);
  assert.match(
    stale.stderr,
    /~ \/operations\/billing\.billing\.on-order\.receive\.orders\.order-placed\/messages: \[\{"\$ref":"#\/channels\/orders\.order-placed\/messages\/orders\.order-placed\.v1"\}\] -> /,
  );
  const updated = await cli(schema, ['asyncapi']);
  await parseAsyncApi(updated.stdout);
});

test('tidings contracts check --against registry names the deployed consumers a change reaches', async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('contracts');
  schemas.push(schema);
  const billing = bus(schema, 'billing');
  billing.subscribe('billing.charge', Placed, () => undefined);
  const audit = bus(schema, 'audit');
  audit.subscribe('audit.all', Placed, () => undefined);
  for (const each of [billing, audit]) await each.start();
  const check = await cli(schema, ['contracts', 'check', '--module', 'test/fixtures/contracts-evolution/breaking.ts']);
  assert.equal(check.code, 1, check.stderr);
  assert.match(
    check.stdout,
    /BREAKING orders\.order-placed v1, field status: enum narrowed: "cancelled" no longer allowed \(consumers: audit\/audit\.all, billing\/billing\.charge\)/,
  );
  assert.match(check.stderr, /breaking changes against the registry/);
});

test('the registry in an empty schema: the CLI says how services get there', async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('registry');
  schemas.push(schema);
  assert.equal((await cli(schema, ['migrate'])).code, 0);
  const empty = await cli(schema, ['asyncapi']);
  assert.equal(empty.code, 1);
  assert.match(empty.stderr, /has no service: a bus records itself when it starts/);
});
