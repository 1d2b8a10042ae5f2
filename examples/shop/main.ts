/**
 * The demo: a small shop of four services (orders -> billing <-> payments, billing -> shipping) talking through Tidings.
 *
 *   npm start                                embedded PostgreSQL (PGlite), nothing to install
 *   DATABASE_URL=postgres://... npm start    the same on a real server
 *   BACKBONE=rabbitmq npm start              messages through RabbitMQ (RABBITMQ_URL, default localhost),
 *   BACKBONE=nats npm start                  or NATS JetStream (NATS_URL); each service's database is
 *                                            still PostgreSQL, its outbox: the services' code is unchanged
 *
 * It places a few hundred orders; billing runs a payment saga for each. Some cards time out twice and succeed
 * on a retry, some are declined, some charges are never answered (the saga times out), and one order carries
 * a currency the gateway rejects every time: that poison message ends in dead letters while everything else
 * flows, and its saga times out too. A declined or timed-out order is compensated: cancelled, its stock
 * released. The shop serves three tenants (tenants.ts): acme is noisy, globex quiet, and initech is suspended
 * until the others are done, then resumed: its orders waited, and catch up. Then it prints what happened.
 */
import { PGlite } from '@electric-sql/pglite';
import type { Backbone } from 'tidings';
import { postgres, resumeTenant, showTenant, suspendTenant, type PgTransaction, type PostgresBackbone, type Queryable } from 'tidings/postgres';
import { writeSystemDocument } from './asyncapi.ts';
import { loginDemo } from './login.ts';
import { CardCharged, CardRefused, ChargeCard, OrderPlaced, PaymentCaptured, PaymentDeclined, ShipmentScheduled } from './contracts.ts';
import { ANSWER_WITHIN_MS, billingService, CardGateway, ordersService, paymentsService, shippingService, shopTables, type NewOrder } from './services.ts';
import { SUSPENDED, TENANTS, TenantMeter, tenantOf } from './tenants.ts';

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
  console.log(`PostgreSQL at ${url.replace(/:[^:@/]*@/, '@')}: dropping this demo's schemas from an earlier run, shop and ${SCHEMA}, if they exist`);
  await pool.query(`drop schema if exists shop cascade`);
  await pool.query(`drop schema if exists ${SCHEMA} cascade`);
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

console.log(`\nThe shop: four services, each with its own bus, that talk only through these messages:\n${picture()}\n`);

const gateway = new CardGateway();
const orders = ordersService(backbone());
const billing = billingService(backbone());
const payments = paymentsService(backbone(), gateway);
const shipping = shippingService(backbone());
const buses = { orders: orders.bus, billing, payments, shipping };
const meter = new TenantMeter();
for (const bus of Object.values(buses)) bus.use(meter.middleware);
for (const bus of Object.values(buses)) await bus.start();
// A broker keeps its dead letters between runs; this run counts only its own.
await payments.backbone.deadLetters().drop({ all: true });
// The shop's database: where the tenants' suspensions are kept (the outbox's, on a broker, whose relay holds the messages).
const shopDatabase = (orders.bus.backbone as { outbox?: PostgresBackbone }).outbox ?? (orders.bus.backbone as PostgresBackbone);
const suspendedAt = Date.now();
await suspendTenant(shopDatabase.driver, { schema: SCHEMA, tenant: SUSPENDED, actor: 'demo', reason: 'unpaid invoice' });

const list: NewOrder[] = Array.from({ length: ORDERS }, (_, i) => ({
  orderId: `order-${String(i + 1).padStart(4, '0')}`,
  customerId: `customer-${(i % 40) + 1}`,
  amountCents: 500 + ((i * 37) % 20_000),
  currency: i === 41 ? 'XXX' : 'EUR',
  // Every 10th card times out twice before it works, every 25th is refused, every 40th charge is never answered.
  card: `4000000000000${i % 25 === 7 ? '003' : i % 40 === 21 ? '004' : i % 10 === 3 ? '002' : '001'}`,
}));
const placing = Date.now();
// Every message of an order's story carries its tenant: withTenant sets it for the publish, and handlers' messages inherit it.
for (let i = 0; i < list.length; i += 10) {
  await Promise.all(list.slice(i, i + 10).map((order, j) => orders.bus.withTenant(tenantOf(i + j), () => orders.placeOrder(order))));
}
console.log(`Placed ${list.length} orders in ${Date.now() - placing} ms (order row + OrderPlaced in one transaction each)`);
const ordersOf = (tenant: string) => list.filter((_, i) => tenantOf(i) === tenant).map((order) => order.orderId);
console.log(`Tenants: ${TENANTS.map((tenant) => `${tenant} ${ordersOf(tenant).length} orders`).join(', ')}; ${SUSPENDED} is suspended (unpaid invoice)\n`);

const count = async (sql: string, params: unknown[] = []) => Number((await db.query<{ n: number }>(sql, params)).rows[0]!.n);
// Every order ends shipped or cancelled: a charge the gateway never answers, or answers only with errors,
// is cancelled by its saga's timeout.
const settled = async (ids: readonly string[]) =>
  (await count(`select count(*)::int as n from shop.shipments where order_id = any($1)`, [ids])) +
  (await count(`select count(*)::int as n from shop.orders where status = 'cancelled' and id = any($1)`, [ids]));
const until = async (done: () => boolean | Promise<boolean>) => {
  const deadline = Date.now() + 60_000 + ANSWER_WITHIN_MS;
  while (!(await done()) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
};
// The others flow while initech is suspended: once billing has every one of their orders, initech is resumed.
const others = TENANTS.filter((tenant) => tenant !== SUSPENDED);
await until(() => others.every((tenant) => meter.report(tenant).orders >= ordersOf(tenant).length));
const othersIn = Date.now();
const waiting = await showTenant(db, { schema: SCHEMA, tenant: SUSPENDED });
await resumeTenant(shopDatabase.driver, { schema: SCHEMA, tenant: SUSPENDED, actor: 'demo' });
await until(() => meter.report(SUSPENDED).orders >= ordersOf(SUSPENDED).length);
console.log(
  `Billing had the others' ${others.map((tenant) => ordersOf(tenant).length).join(' + ')} orders ${othersIn - placing} ms after placing began, while ${SUSPENDED}'s waited ` +
    `(${waiting.held} messages held); resumed after ${othersIn - suspendedAt} ms of suspension, it caught up in ${Date.now() - othersIn} ms.\n`,
);
await until(async () => (await settled(list.map((order) => order.orderId))) >= list.length);
const elapsed = Date.now() - placing;
console.log('Per tenant, as counted by a middleware on every bus (the wait: from an order placed to billing handling it):');
printTable([
  ['tenant', 'orders', 'handled', 'wait p50 ms', 'wait p99 ms'],
  ...TENANTS.map((tenant) => {
    const { handled, p50, p99 } = meter.report(tenant);
    return [
      `${tenant}${tenant === 'acme' ? ' (noisy)' : tenant === SUSPENDED ? ' (suspended)' : ''}`,
      String(ordersOf(tenant).length),
      String(handled),
      String(p50),
      String(p99),
    ];
  }),
]);
console.log('');

console.log('Per service, as counted by each bus:');
const rows: string[][] = [['service', 'subscription', 'handled', 'retried', 'dead-lettered']];
for (const [service, bus] of Object.entries(buses)) {
  for (const [name, stats] of Object.entries(bus.stats().subscriptions)) {
    rows.push([service, name, String(stats.handled), String(stats.retried), String(stats.deadLettered)]);
  }
}
printTable(rows);
const retried = Object.values(buses).reduce((sum, bus) => sum + Object.values(bus.stats().subscriptions).reduce((n, stats) => n + stats.retried, 0), 0);

const paid = await count(`select count(*)::int as n from shop.payments`);
const shipped = await count(`select count(*)::int as n from shop.shipments`);
const cancelled = await count(`select count(*)::int as n from shop.orders where status = 'cancelled'`);
const timedOut = await count(`select count(*)::int as n from shop.orders where cancel_reason like 'no answer%'`);
const reserved = await count(`select reserved as n from shop.stock where sku = 'widget'`);
const { deadLetters: dead } = await buses.payments.backbone.deadLetters().list({ all: true });
const sagas = buses.billing.stats().sagas['billing.payment'];
console.log(
  `\nBilling's payment sagas: ${sagas?.started ?? 0} started, ${sagas?.completed ?? 0} completed: ${paid} paid, ${cancelled - timedOut} refused by the card's issuer, ` +
    `${timedOut} timed out (no answer from the gateway within ${ANSWER_WITHIN_MS / 1_000} s); ${cancelled} compensated: order cancelled, stock released.`,
);
console.log(
  `\nIn the databases after ${elapsed} ms: ${list.length} orders, ${paid} paid, ${shipped} shipped, ${cancelled} cancelled, ${reserved} widgets reserved, ${dead.length} in dead letters`,
);
for (const letter of dead) {
  console.log(`  dead letter ${letter.messageId} in ${letter.subscription} after ${letter.attempts} attempts: ${letter.reason}`);
}
// Why the retries: the gateway timed out on purpose (every 10th card, twice before it works), and the
// poison order was tried as often as the payments service's retry policy allows before it went to dead letters.
const poisonRetries = dead.reduce((sum, letter) => sum + letter.attempts - 1, 0);
console.log(
  `\n${retried} retries: ${gateway.timeouts} gateway timeouts (${gateway.timedOutOrders} cards time out twice, then work)` +
    (dead.length === 0 ? '.' : ` + ${poisonRetries} for the poison order (1 at once, then after 200, 500 and 1,000 ms) before it was dead-lettered.`),
);
const published = Object.assign({}, ...Object.values(buses).map((bus) => bus.stats().published)) as Record<string, number>;
console.log(`\nWho told whom what, with the number of events:\n${picture(published)}`);
const consistent = paid === shipped && paid + cancelled === list.length && reserved === paid && sagas?.completed === list.length;
console.log(consistent ? '\nEvery order is accounted for: nothing lost, nothing twice.' : '\nSome orders are unaccounted for.');

for (const bus of Object.values(buses)) await bus.stop();
const loginsOk = await loginDemo(database, db);
await writeSystemDocument(db, SCHEMA, kind);
await closeDb();
process.exitCode = consistent && loginsOk ? 0 : 1;

// What to try next: the operations CLI on what this run left behind, then the code.
console.log('\nNext:');
if (url === undefined) {
  console.log('  DATABASE_URL=postgres://... npm start   the same on a PostgreSQL server, whose tables stay for the tidings CLI to explore');
} else {
  console.log(`  export DATABASE_URL=... TIDINGS_SCHEMA=${SCHEMA}   (the DATABASE_URL given to npm start)`);
  console.log('  npx tidings status');
  if (kind === 'postgres' && dead[0] !== undefined) console.log(`  npx tidings dead-letters show ${dead[0].messageId}`);
  console.log('  npx tidings tail orders.order-placed --from 1 --limit 5');
  console.log(`  npx tidings tenants show ${SUSPENDED}   its usage, and the suspend and resume this run recorded`);
  if (kind === 'postgres') console.log('  npx tidings asyncapi --check examples/shop/asyncapi.json   the registry against the committed AsyncAPI document');
}
// A URL from the environment is named, not printed: it may hold a password.
const brokerUrl = (name: string, fallback: string) => (process.env[name] === undefined ? fallback : `"$${name}"`);
if (kind === 'rabbitmq')
  console.log(
    `  npx tidings dead-letters show ${dead[0]?.messageId ?? '<id>'} --url ${brokerUrl('RABBITMQ_URL', 'amqp://guest:guest@127.0.0.1:5672')} --prefix shop.`,
  );
if (kind === 'nats')
  console.log(`  npx tidings dead-letters show ${dead[0]?.messageId ?? '<id>'} --url ${brokerUrl('NATS_URL', 'nats://127.0.0.1:4222')} --stream SHOP`);
console.log('  npm run quickstart   the smallest program; then read examples/shop/services.ts');

function printTable(table: string[][]): void {
  const widths = table[0]!.map((_, column) => Math.max(...table.map((row) => row[column]!.length)));
  for (const [index, row] of table.entries()) {
    console.log(`  ${row.map((cell, column) => (column === 0 || column === 1 ? cell.padEnd(widths[column]!) : cell.padStart(widths[column]!))).join('  ')}`);
    if (index === 0) console.log(`  ${widths.map((width) => '-'.repeat(width)).join('  ')}`);
  }
}

/**
 * The services and the messages between them; with `counts` (published per topic), the number beside each
 * arrow. Only what the shop's code does: orders publishes OrderPlaced; billing's saga sends ChargeCard to
 * payments, which answers CardCharged or CardRefused (or nothing); billing then publishes PaymentCaptured or
 * PaymentDeclined; shipping answers with ShipmentScheduled (which nobody consumes yet).
 */
function picture(counts?: Record<string, number>): string {
  const label = (name: string, topic: string) => (counts === undefined ? name : `${name} ${counts[topic] ?? 0}`);
  const first = `  orders ── ${label('OrderPlaced', OrderPlaced.topic)} ──▶ billing ── ${label('PaymentCaptured', PaymentCaptured.topic)} ──▶ shipping ── ${label('ShipmentScheduled', ShipmentScheduled.topic)} ──▶ (no subscriber yet)`;
  const left = first.indexOf('billing') + 1; // billing's two lines down: the declined one and the charge
  const declined = ` ${label('PaymentDeclined', PaymentDeclined.topic)} `;
  const charge = `${label('ChargeCard', ChargeCard.topic)} `;
  const answers = ` ${label('CardCharged', CardCharged.topic)}, ${label('CardRefused', CardRefused.topic)}`;
  const pad = (text: string, width: number) => text + ' '.repeat(Math.max(0, width - text.length));
  return [
    first,
    `${pad('     ▲', left)}│ │ ▲`,
    `${pad(`     └${'─'.repeat(Math.max(1, left - 7 - declined.length))}${declined}`, left - 1)}─┘ │ │`,
    `${pad('', left + 2 - charge.length)}${charge}▼ │${answers}`,
    `${pad('', left - 1)}payments`,
  ].join('\n');
}
