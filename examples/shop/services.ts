/**
 * Three services of a small shop. Each has its own bus (its own name, its own subscriptions) and writes its
 * own tables; they share nothing but the contracts and the database the bus lives in.
 */
import { createBus, PermanentError, type Backbone, type Bus } from 'tidings';
import type { PgTransaction } from 'tidings/postgres';
import { paymentSaga } from './billing.ts';
import { CardCharged, CardRefused, ChargeCard, OrderPlaced, PaymentCaptured, PaymentDeclined, ShipmentScheduled } from './contracts.ts';

type ShopBus = Bus<PgTransaction>;
/** Any backbone whose transactions are PostgreSQL's: postgres(), or a broker with a PostgreSQL outbox. */
type ShopBackbone = Backbone<PgTransaction>;

/**
 * Orders: takes orders (the order row, its stock reservation and OrderPlaced in one transaction); cancels a
 * declined one and releases its stock.
 */
export function ordersService(backbone: ShopBackbone): { bus: ShopBus; placeOrder: (order: NewOrder) => Promise<void> } {
  const bus = createBus({ service: 'orders', backbone, publishes: [OrderPlaced] });
  bus.subscribe('orders.on-payment-declined', PaymentDeclined, async (message, ctx) => {
    const cancelled = await ctx.tx.query(`update shop.orders set status = 'cancelled', cancel_reason = $2 where id = $1 and status = 'placed' returning id`, [
      message.data.orderId,
      message.data.reason,
    ]);
    if (cancelled.rows.length === 1) await ctx.tx.query(`update shop.stock set reserved = reserved - 1 where sku = 'widget'`);
  });
  const placeOrder = (order: NewOrder) =>
    bus.transaction(async (tx) => {
      await tx.query('insert into shop.orders (id, customer_id, amount_cents, status) values ($1, $2, $3, $4)', [
        order.orderId,
        order.customerId,
        order.amountCents,
        'placed',
      ]);
      await tx.query(`update shop.stock set reserved = reserved + 1 where sku = 'widget'`);
      // The transactional outbox: this event exists if and only if the order row commits.
      await bus.publish(OrderPlaced, order, { tx });
    });
  return { bus, placeOrder };
}

export interface NewOrder {
  orderId: string;
  customerId: string;
  amountCents: number;
  currency: string;
  card: string;
}

/**
 * A card gateway with moods: some cards time out a couple of times, some are refused, some charges are never
 * answered (the answer is lost), one currency is unknown.
 */
export class CardGateway {
  readonly #timeouts = new Map<string, number>();
  /** Timeouts thrown so far, and how many orders had them: the demo explains its retries with these. */
  timeouts = 0;
  get timedOutOrders(): number {
    return this.#timeouts.size;
  }
  charge(orderId: string, card: string, currency: string): 'ok' | 'declined' | 'no answer' {
    if (currency === 'XXX') throw new Error(`gateway rejects currency ${currency} for order ${orderId}`);
    if (card.endsWith('0002')) {
      const seen = (this.#timeouts.get(orderId) ?? 0) + 1;
      this.#timeouts.set(orderId, seen);
      if (seen <= 2) {
        this.timeouts++;
        throw new Error(`gateway timeout charging order ${orderId} (try ${seen})`);
      }
    }
    if (card.endsWith('0003')) return 'declined';
    if (card.endsWith('0004')) return 'no answer';
    return 'ok';
  }
}

/**
 * Payments: the card gateway's adapter. Charges each ChargeCard command and answers with CardCharged or
 * CardRefused; a timeout is retried; a charge the gateway never answers gets no answer (billing's saga times out).
 */
export function paymentsService(backbone: ShopBackbone, gateway: CardGateway): ShopBus {
  const bus = createBus({ service: 'payments', backbone, publishes: [CardCharged, CardRefused] });
  bus.subscribe(
    'payments.charge-cards',
    ChargeCard,
    async (message, ctx) => {
      const charge = message.data;
      if (charge.amountCents > 1_000_000) throw new PermanentError(`order ${charge.orderId} is over the card limit`);
      const result = gateway.charge(charge.orderId, charge.card, charge.currency);
      if (result === 'ok') await ctx.publish(CardCharged, { orderId: charge.orderId, chargeId: `ch-${charge.orderId}` });
      if (result === 'declined') await ctx.publish(CardRefused, { orderId: charge.orderId, reason: 'card refused by issuer' });
    },
    // Short delays so the demo shows retries in seconds; production would wait longer.
    { concurrency: 8, retry: { immediate: 1, delayed: [200, 500, 1_000] } },
  );
  return bus;
}

/** How long billing waits for the gateway's answer: short, for the demo. */
export const ANSWER_WITHIN_MS = 3_000;

/** Billing: one payment saga per order (examples/shop/billing.ts); records each captured payment. */
export function billingService(backbone: ShopBackbone): ShopBus {
  const bus = createBus({ service: 'billing', backbone, publishes: [ChargeCard, PaymentCaptured, PaymentDeclined] });
  const saga = paymentSaga({
    answerWithinMs: ANSWER_WITHIN_MS,
    recordPayment: async (tx, payment) => {
      await (tx as PgTransaction).query('insert into shop.payments (id, order_id, amount_cents) values ($1, $2, $3)', [
        payment.paymentId,
        payment.orderId,
        payment.amountCents,
      ]);
    },
  });
  bus.saga(saga, { concurrency: 8 });
  return bus;
}

/** Shipping: books a parcel for each captured payment. */
export function shippingService(backbone: ShopBackbone): ShopBus {
  const bus = createBus({ service: 'shipping', backbone, publishes: [ShipmentScheduled] });
  bus.subscribe('shipping.ship-paid-orders', PaymentCaptured, async (message, ctx) => {
    const shipmentId = `ship-${message.data.orderId}`;
    await ctx.tx.query('insert into shop.shipments (id, order_id) values ($1, $2)', [shipmentId, message.data.orderId]);
    await ctx.publish(ShipmentScheduled, { orderId: message.data.orderId, shipmentId });
  });
  return bus;
}

export const shopTables = [
  'create schema if not exists shop',
  'create table if not exists shop.orders (id text primary key, customer_id text not null, amount_cents int not null, status text not null, cancel_reason text)',
  'create table if not exists shop.stock (sku text primary key, reserved int not null)',
  "insert into shop.stock (sku, reserved) values ('widget', 0) on conflict do nothing",
  'create table if not exists shop.payments (id text primary key, order_id text not null unique, amount_cents int not null)',
  'create table if not exists shop.shipments (id text primary key, order_id text not null unique)',
];
