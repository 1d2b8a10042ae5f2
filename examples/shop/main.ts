/**
 * The demo: a small shop of three services (orders -> billing -> shipping) talking through Tidings.
 *
 *   npm start                                embedded PostgreSQL (PGlite), nothing to install
 *   DATABASE_URL=postgres://... npm start    the same on a real server
 *   BACKBONE=rabbitmq npm start              messages through RabbitMQ (RABBITMQ_URL, default localhost),
 *   BACKBONE=nats npm start                  or NATS JetStream (NATS_URL); each service's database is
 *                                            still PostgreSQL, its outbox: the services' code is unchanged
 *
 * It places a few hundred orders. Some cards time out twice and succeed on a retry, some are declined
 * (the order is cancelled), and one order carries a currency the gateway rejects every time: that poison
 * message ends in dead letters while everything else flows. Then it prints what happened.
 */
import { PGlite } from '@electric-sql/pglite';
import type { Backbone } from 'tidings';
import { postgres, type PgTransaction, type PostgresBackbone, type Queryable } from 'tidings/postgres';
import { loginDemo } from './login.ts';
import { billingService, CardGateway, ordersService, shippingService, shopTables, type NewOrder } from './services.ts';

const ORDERS = Number(process.env.ORDERS ?? 300);
const SCHEMA = 'tidings_shop';
const url = process.env.DATABASE_URL;

const started = Date.now();
let db: Queryable;
let database: () => PostgresBackbone;
let closeDb = async () => {};
if (url === undefined) {
  const lite = await PGlite.create();
  db = lite;
  // One embedded database in this process; each service gets its own bus on it.
  database = () => postgres({ pglite: lite, schema: SCHEMA });
  closeDb = () => lite.close();
  console.log(`Embedded PostgreSQL (PGlite) ready in ${Date.now() - started} ms`);
} else {
  const pg = (await import('pg')).default;
  const pool = new pg.Pool({ connectionString: url, max: 4 });
  db = pool;
  database = () => postgres({ url, schema: SCHEMA });
  closeDb = () => pool.end();
  await pool.query(`drop schema if exists shop cascade`);
  await pool.query(`drop schema if exists ${SCHEMA} cascade`);
  console.log(`PostgreSQL at ${url.replace(/:[^:@/]*@/, '@')}`);
}
for (const statement of shopTables) await db.query(statement);

// The backbone is configuration: the services below do not know which one carries their messages.
const kind = process.env.BACKBONE ?? 'postgres';
let backbone: () => Backbone<PgTransaction>;
if (kind === 'rabbitmq') {
  const { rabbitmq } = await import('tidings/rabbitmq');
  const rabbitUrl = process.env.RABBITMQ_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
  backbone = () => rabbitmq({ url: rabbitUrl, prefix: 'shop.', outbox: database() });
  console.log(`Messages through RabbitMQ at ${rabbitUrl.replace(/:[^:@/]*@/, '@')}, with each service's outbox in PostgreSQL`);
} else if (kind === 'nats') {
  const { nats } = await import('tidings/nats');
  const natsUrl = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';
  backbone = () => nats({ servers: natsUrl, stream: 'SHOP', subjectPrefix: 'shop', outbox: database() });
  console.log(`Messages through NATS JetStream at ${natsUrl}, with each service's outbox in PostgreSQL`);
} else if (kind === 'postgres') {
  backbone = database;
} else {
  throw new Error(`BACKBONE must be postgres, rabbitmq or nats, not ${JSON.stringify(kind)}`);
}

const gateway = new CardGateway();
const orders = ordersService(backbone());
const billing = billingService(backbone(), gateway);
const shipping = shippingService(backbone());
const buses = { orders: orders.bus, billing, shipping };
for (const bus of Object.values(buses)) await bus.start();
// A broker keeps its dead letters between runs; this run counts only its own.
await billing.backbone.deadLetters().drop({ all: true });

const list: NewOrder[] = Array.from({ length: ORDERS }, (_, i) => ({
  orderId: `order-${String(i + 1).padStart(4, '0')}`,
  customerId: `customer-${(i % 40) + 1}`,
  amountCents: 500 + ((i * 37) % 20_000),
  currency: i === 41 ? 'XXX' : 'EUR',
  // Every 10th card times out twice before it works, every 25th is refused.
  card: `4000000000000${i % 25 === 7 ? '003' : i % 10 === 3 ? '002' : '001'}`,
}));
const placing = Date.now();
for (let i = 0; i < list.length; i += 10) await Promise.all(list.slice(i, i + 10).map((order) => orders.placeOrder(order)));
console.log(`Placed ${list.length} orders in ${Date.now() - placing} ms (order row + OrderPlaced in one transaction each)\n`);

const count = async (sql: string) => Number((await db.query<{ n: number }>(sql)).rows[0]!.n);
const settled = async () =>
  (await count(`select count(*)::int as n from shop.shipments`)) +
  (await count(`select count(*)::int as n from shop.orders where status = 'cancelled'`)) +
  (await buses.billing.backbone.deadLetters().count({ all: true }));
const deadline = Date.now() + 60_000;
while ((await settled()) < list.length && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
const elapsed = Date.now() - placing;

console.log('Per service, as counted by each bus:');
const rows: string[][] = [['service', 'subscription', 'handled', 'retried', 'dead-lettered']];
for (const [service, bus] of Object.entries(buses)) {
  for (const [name, stats] of Object.entries(bus.stats().subscriptions)) {
    rows.push([service, name, String(stats.handled), String(stats.retried), String(stats.deadLettered)]);
  }
}
printTable(rows);
console.log('\nPublished, per topic:');
printTable([
  ['service', 'topic', 'published'],
  ...Object.entries(buses).flatMap(([service, bus]) => Object.entries(bus.stats().published).map(([topic, n]) => [service, topic, String(n)])),
]);

const paid = await count(`select count(*)::int as n from shop.payments`);
const shipped = await count(`select count(*)::int as n from shop.shipments`);
const cancelled = await count(`select count(*)::int as n from shop.orders where status = 'cancelled'`);
const { deadLetters: dead } = await buses.billing.backbone.deadLetters().list({ all: true });
console.log(`\nIn the databases after ${elapsed} ms: ${list.length} orders, ${paid} paid, ${shipped} shipped, ${cancelled} cancelled (declined), ${dead.length} in dead letters`);
for (const letter of dead) {
  console.log(`  dead letter ${letter.messageId} in ${letter.subscription} after ${letter.attempts} attempts: ${letter.reason}`);
}
const consistent = paid === shipped && paid + cancelled + dead.length === list.length;
console.log(consistent ? '\nEvery order is accounted for: nothing lost, nothing twice.' : '\nSome orders are unaccounted for.');

for (const bus of Object.values(buses)) await bus.stop();
const loginsOk = await loginDemo(database, db);
await closeDb();
process.exitCode = consistent && loginsOk ? 0 : 1;

function printTable(table: string[][]): void {
  const widths = table[0]!.map((_, column) => Math.max(...table.map((row) => row[column]!.length)));
  for (const [index, row] of table.entries()) {
    console.log('  ' + row.map((cell, column) => (column === 0 || column === 1 ? cell.padEnd(widths[column]!) : cell.padStart(widths[column]!))).join('  '));
    if (index === 0) console.log('  ' + widths.map((width) => '-'.repeat(width)).join('  '));
  }
}
