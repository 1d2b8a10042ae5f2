// The README's quick start, as a program CI runs: `npm run quickstart`.
import { z } from 'zod';
import { createBus, defineEvent } from 'tidings';
import { postgres } from 'tidings/postgres';

const OrderPlaced = defineEvent('orders.order-placed', {
  version: 1,
  schema: z.object({ orderId: z.string(), totalCents: z.number().int() }),
  key: (order) => order.orderId, // messages of one order are handled in order
  description: 'A customer placed an order.',
});

// A connection URL for a PostgreSQL server, or embedded PostgreSQL in this process.
const backbone = process.env.DATABASE_URL ? postgres({ url: process.env.DATABASE_URL }) : postgres({ pglite: true });
const bus = createBus({ service: 'orders', backbone });
bus.stopOnSignals(); // Ctrl-C or SIGTERM: finish the messages in flight, release leases, then exit

let charged = 0;
bus.subscribe(
  'billing',
  OrderPlaced,
  async (message, ctx) => {
    // message.data is typed { orderId: string; totalCents: number }.
    // Writes through ctx.tx commit together with the acknowledgement: exactly once.
    await ctx.tx.query('select $1::text as charged', [message.data.orderId]);
    charged++;
  },
  { concurrency: 8, retry: { immediate: 2, delayed: [1_000, 10_000, 60_000] } },
);

await bus.start();
await bus.transaction(async (tx) => {
  await tx.query('select 1'); // your own writes, in the same transaction
  await bus.publish(OrderPlaced, { orderId: 'o-1', totalCents: 4_200 }, { tx });
});
await bus.publish(OrderPlaced, { orderId: 'o-2', totalCents: 990 }); // on its own: durable when it resolves

while (charged < 2) await new Promise((resolve) => setTimeout(resolve, 10));
console.log(`billing handled ${charged} orders`);
await bus.stop(); // graceful: finishes in-flight handlers, commits their acks, releases leases
