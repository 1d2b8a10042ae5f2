/**
 * Compile-time checks, run by `npm run typecheck` (part of `npm test`): types flow from a contract to
 * publish and to handlers with no casts. Every `@ts-expect-error` line must fail to compile.
 */
import { z } from 'zod';
import { createBus, defineCommand, defineEvent, type RetryOptions } from '../src/index.ts';
import { optionNames } from '../src/core/options.ts';
import { postgres } from '../src/postgres/index.ts';

const Placed = defineEvent('orders.order-placed', {
  schema: z.object({ orderId: z.string(), total: z.number(), placedAt: z.string().transform((s) => new Date(s)) }),
  key: (order) => order.orderId,
});
const bus = createBus({ service: 'orders', backbone: postgres({ pglite: true }) });

export async function typeChecks(): Promise<void> {
  await bus.publish(Placed, { orderId: 'o', total: 1, placedAt: '2026-01-01' });
  // @ts-expect-error total must be a number
  await bus.publish(Placed, { orderId: 'o', total: '1', placedAt: '2026-01-01' });
  // @ts-expect-error orderId is required
  await bus.publish(Placed, { total: 1, placedAt: '2026-01-01' });
  bus.subscribe('billing', Placed, async (message, ctx) => {
    const total: number = message.data.total;
    // The handler sees the schema's output type: the transform made a Date.
    const placedAt: Date = message.data.placedAt;
    // @ts-expect-error no such field
    void message.data.customer;
    // ctx.tx is the backbone's transaction type
    await ctx.tx.query('select $1::int', [total + placedAt.getTime()]);
  });
  await bus.transaction(async (tx) => {
    await bus.publish(Placed, { orderId: 'o', total: 1, placedAt: '2026-01-01' }, { tx });
  });
}

const Quote = defineCommand('types.quote', {
  schema: z.object({ sku: z.string() }),
  reply: z.object({ price: z.number(), at: z.string().transform((s) => new Date(s)) }),
});

export async function requestTypeChecks(): Promise<void> {
  // The handler returns the reply's input type...
  bus.subscribe('pricing', Quote, (message) => ({ price: message.data.sku.length, at: '2026-01-01' }));
  // @ts-expect-error the reply's price must be a number
  bus.subscribe('pricing-bad', Quote, () => ({ price: 'free', at: '2026-01-01' }));
  // ...and the requester gets its output type.
  const reply = await bus.request(Quote, { sku: 'a' });
  const price: number = reply.price;
  const at: Date = reply.at;
  void [price, at];
  // @ts-expect-error an event declares no reply
  await bus.request(Placed, { orderId: 'o', total: 1, placedAt: '2026-01-01' });
}

// src/core/standard-schema.ts is a copy of the Standard Schema interface: it must accept the spec's and be
// accepted by it, so any library that implements the spec fits a contract.
type Spec = import('@standard-schema/spec').StandardSchemaV1<{ a: string }, { a: number }>;
type Ours = import('../src/index.ts').StandardSchemaV1<{ a: string }, { a: number }>;
export const specFitsOurs = (schema: Spec): Ours => schema;
export const oursFitsSpec = (schema: Ours): Spec => schema;

// optionNames lists every option of a type, or does not compile: the unknown-key check cannot fall behind.
export const allRetryOptions = optionNames<RetryOptions>()('immediate', 'delayed', 'jitter');
// @ts-expect-error jitter is left out
export const someRetryOptions = optionNames<RetryOptions>()('immediate', 'delayed');
// @ts-expect-error not an option
export const wrongRetryOptions = optionNames<RetryOptions>()('immediate', 'delayed', 'jitter', 'nope');

// Upcasters return the new version's input; the old data is unknown unless the upcaster types it.
export const PlacedV2 = defineEvent('orders.order-placed', {
  version: 2,
  schema: z.object({ orderId: z.string(), cents: z.number() }),
  upcast: {
    1: (v1: { orderId: string; total: number }) => ({ orderId: v1.orderId, cents: v1.total * 100 }),
  },
});
export const PlacedV3 = defineEvent('orders.order-placed', {
  version: 3,
  schema: z.object({ orderId: z.string() }),
  upcast: {
    // @ts-expect-error an inline upcaster gets unknown: narrow it or type its parameter
    1: (v1) => ({ orderId: v1.orderId }),
    // @ts-expect-error it must return version 3's data
    2: (v2: { orderId: string }) => ({ order: v2.orderId }),
  },
});
export function upcastTypeChecks(): void {
  // A handler on version 2 sees version 2's data, whatever version was published.
  bus.subscribe('upcast', PlacedV2, (message) => {
    const cents: number = message.data.cents;
    void cents;
  });
}
