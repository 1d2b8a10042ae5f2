/**
 * Three services of a small shop. Each has its own bus (its own name, its own subscriptions) and writes its
 * own tables; they share nothing but the contracts and the database the bus lives in.
 */
import { createBus, PermanentError, type Backbone, type Bus } from 'tidings';
import type { PgTransaction } from 'tidings/postgres';
import { OrderPlaced, PaymentCaptured, PaymentDeclined, ShipmentScheduled } from './contracts.ts';

type ShopBus = Bus<PgTransaction>;
/** Any backbone whose transactions are PostgreSQL's: postgres(), or a broker with a PostgreSQL outbox. */
type ShopBackbone = Backbone<PgTransaction>;

/** Orders: takes orders (writing the order and publishing OrderPlaced in one transaction), cancels declined ones. */
export function ordersService(backbone: ShopBackbone): { bus: ShopBus; placeOrder: (order: NewOrder) => Promise<void> } {
  const bus = createBus({ service: 'orders', backbone });
  bus.subscribe('orders.on-payment-declined', PaymentDeclined, async (message, ctx) => {
    await ctx.tx.query(`update shop.orders set status = 'cancelled' where id = $1`, [message.data.orderId]);
  });
  const placeOrder = (order: NewOrder) =>
    bus.transaction(async (tx) => {
      await tx.query('insert into shop.orders (id, customer_id, amount_cents, status) values ($1, $2, $3, $4)', [
        order.orderId,
        order.customerId,
        order.amountCents,
        'placed',
      ]);
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

/** A card gateway with moods: some cards time out a couple of times, some are refused, one currency is unknown. */
export class CardGateway {
  readonly #timeouts = new Map<string, number>();
  /** Timeouts thrown so far, and how many orders had them: the demo explains its retries with these. */
  timeouts = 0;
  get timedOutOrders(): number {
    return this.#timeouts.size;
  }
  charge(orderId: string, card: string, currency: string): 'ok' | 'declined' {
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
    return 'ok';
  }
}

/** Billing: charges each order; records the payment and announces it in the same transaction as the ack. */
export function billingService(backbone: ShopBackbone, gateway: CardGateway): ShopBus {
  const bus = createBus({ service: 'billing', backbone });
  bus.subscribe(
    'billing.charge-orders',
    OrderPlaced,
    async (message, ctx) => {
      const order = message.data;
      if (order.amountCents > 1_000_000) throw new PermanentError(`order ${order.orderId} is over the card limit`);
      const result = gateway.charge(order.orderId, order.card, order.currency);
      if (result === 'declined') {
        await ctx.publish(PaymentDeclined, { orderId: order.orderId, reason: 'card refused by issuer' });
        return;
      }
      const paymentId = `pay-${order.orderId}`;
      await ctx.tx.query('insert into shop.payments (id, order_id, amount_cents) values ($1, $2, $3)', [
        paymentId,
        order.orderId,
        order.amountCents,
      ]);
      await ctx.publish(PaymentCaptured, { orderId: order.orderId, paymentId, amountCents: order.amountCents });
    },
    // Short delays so the demo shows retries in seconds; production would wait longer.
    { concurrency: 8, retry: { immediate: 1, delayed: [200, 500, 1_000] } },
  );
  return bus;
}

/** Shipping: books a parcel for each captured payment. */
export function shippingService(backbone: ShopBackbone): ShopBus {
  const bus = createBus({ service: 'shipping', backbone });
  bus.subscribe('shipping.ship-paid-orders', PaymentCaptured, async (message, ctx) => {
    const shipmentId = `ship-${message.data.orderId}`;
    await ctx.tx.query('insert into shop.shipments (id, order_id) values ($1, $2)', [shipmentId, message.data.orderId]);
    await ctx.publish(ShipmentScheduled, { orderId: message.data.orderId, shipmentId });
  });
  return bus;
}

export const shopTables = [
  'create schema if not exists shop',
  'create table if not exists shop.orders (id text primary key, customer_id text not null, amount_cents int not null, status text not null)',
  'create table if not exists shop.payments (id text primary key, order_id text not null unique, amount_cents int not null)',
  'create table if not exists shop.shipments (id text primary key, order_id text not null unique)',
];
