/**
 * Billing's payment saga, one instance per order: it asks the card gateway to charge the card and waits for
 * the answer. Charged: the payment is recorded and announced. Refused, or no answer in time: the order is
 * compensated (PaymentDeclined; orders cancels it and releases its stock). Where the payment is recorded is
 * passed in, so the same saga runs on PostgreSQL in the demo and in memory in its test
 * (test/shop.unit.test.ts, with tidings/testing's virtual clock).
 */
import { z } from 'zod';
import { defineSaga } from 'tidings';
import { CardCharged, CardRefused, ChargeCard, OrderPlaced, PaymentCaptured, PaymentDeclined } from './contracts.ts';

export interface PaymentRecord {
  paymentId: string;
  orderId: string;
  amountCents: number;
}

export interface PaymentSagaOptions {
  /** How long to wait for the gateway's answer before the order is compensated. */
  answerWithinMs: number;
  /** Records a captured payment in the transition's transaction (`tx`: the backbone's). */
  recordPayment: (tx: unknown, payment: PaymentRecord) => Promise<void>;
}

export const paymentStatus = z.enum(['charging', 'paid', 'refused', 'timed-out']);

export function paymentSaga(options: PaymentSagaOptions) {
  return defineSaga({
    name: 'billing.payment',
    state: z.object({ orderId: z.string(), amountCents: z.number().int(), status: paymentStatus }),
    messages: { placed: OrderPlaced, charged: CardCharged, refused: CardRefused },
    correlate: { placed: (order) => order.orderId, charged: (charge) => charge.orderId, refused: (refusal) => refusal.orderId },
    start: {
      placed: async ({ data: order }, ctx) => {
        await ctx.publish(ChargeCard, { orderId: order.orderId, amountCents: order.amountCents, currency: order.currency, card: order.card });
        await ctx.requestTimeout('no-answer', options.answerWithinMs);
        return { orderId: order.orderId, amountCents: order.amountCents, status: 'charging' as const };
      },
    },
    handle: {
      charged: async (state, _message, ctx) => {
        const paymentId = `pay-${state.orderId}`;
        await options.recordPayment(ctx.tx, { paymentId, orderId: state.orderId, amountCents: state.amountCents });
        await ctx.publish(PaymentCaptured, { orderId: state.orderId, paymentId, amountCents: state.amountCents });
        ctx.complete();
        return { ...state, status: 'paid' as const };
      },
      refused: async (state, { data: refusal }, ctx) => {
        await ctx.publish(PaymentDeclined, { orderId: state.orderId, reason: refusal.reason });
        ctx.complete();
        return { ...state, status: 'refused' as const };
      },
    },
    timeouts: {
      // A late answer finds the saga complete and is ignored (counted in bus.stats().sagas).
      'no-answer': async (state, _data, ctx) => {
        await ctx.publish(PaymentDeclined, { orderId: state.orderId, reason: `no answer from the card gateway within ${options.answerWithinMs} ms` });
        ctx.complete();
        return { ...state, status: 'timed-out' as const };
      },
    },
  });
}
