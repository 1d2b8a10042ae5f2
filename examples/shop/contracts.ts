/**
 * The shop's contracts: one place defines every message, its schema and its partition key. Services
 * import them; types flow from here to `publish` and to every handler's `message.data`.
 */
import { z } from 'zod';
import { defineCommand, defineEvent } from 'tidings';

export const OrderPlaced = defineEvent('orders.order-placed', {
  schema: z.object({
    orderId: z.string(),
    customerId: z.string(),
    amountCents: z.number().int().positive(),
    currency: z.string().length(3),
    card: z.string().regex(/^\d{16}$/),
  }),
  key: (order) => order.orderId,
  description: 'A customer placed an order; billing starts a payment saga for it.',
});

export const PaymentCaptured = defineEvent('billing.payment-captured', {
  schema: z.object({ orderId: z.string(), paymentId: z.string(), amountCents: z.number().int() }),
  key: (payment) => payment.orderId,
  description: 'The card was charged; shipping may ship.',
});

export const PaymentDeclined = defineEvent('billing.payment-declined', {
  schema: z.object({ orderId: z.string(), reason: z.string() }),
  key: (payment) => payment.orderId,
  description: 'The card was refused, or the gateway never answered; orders cancels the order and releases its stock.',
});

export const ShipmentScheduled = defineEvent('shipping.shipment-scheduled', {
  schema: z.object({ orderId: z.string(), shipmentId: z.string() }),
  key: (shipment) => shipment.orderId,
  description: 'A parcel is booked for a paid order.',
});

export const ChargeCard = defineCommand('payments.charge-card', {
  schema: z.object({ orderId: z.string(), amountCents: z.number().int().positive(), currency: z.string().length(3), card: z.string() }),
  key: (charge) => charge.orderId,
  description: "Billing asks the card gateway to charge an order's card; it answers with CardCharged or CardRefused, or not at all.",
});

export const CardCharged = defineEvent('payments.card-charged', {
  schema: z.object({ orderId: z.string(), chargeId: z.string() }),
  key: (charge) => charge.orderId,
  description: 'The gateway charged the card.',
});

export const CardRefused = defineEvent('payments.card-refused', {
  schema: z.object({ orderId: z.string(), reason: z.string() }),
  key: (charge) => charge.orderId,
  description: "The card's issuer refused the charge.",
});
