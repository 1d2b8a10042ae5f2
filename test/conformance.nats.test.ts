/**
 * The conformance suite (test/conformance/suite.ts) on NATS JetStream with a PostgreSQL outbox: the same
 * application code as on PostgreSQL, transactions and exactly-once effects included.
 */
import { conformance } from './conformance/suite.ts';
import { postgresSchema, quickPostgres } from './conformance/postgres.ts';
import { nats } from '../src/nats/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { DATABASE_URL, dropSchema } from './helpers.ts';
import { natsNamespace } from './fixtures/nats.ts';

conformance<PgTransaction>({
  name: 'nats with a postgres outbox',
  namespace: async (t) => {
    const ns = await natsNamespace(t, 'c');
    if (ns === undefined) return undefined;
    const pg = await postgresSchema(t, 'nats');
    if (pg === undefined) return undefined;
    return {
      backbone: () => nats(ns.options({ outbox: postgres({ url: DATABASE_URL, schema: pg.schema, ...quickPostgres }) })),
      effects: pg.effects,
      cleanup: async () => {
        await ns.cleanup();
        await dropSchema(pg.schema);
      },
    };
  },
  offers: { transactions: true, durable: true, balances: true, commandOwners: true },
});

conformance<PgTransaction>({
  name: 'nats alone (no outbox: no transactions, the stream de-duplicates ids)',
  namespace: async (t) => {
    const ns = await natsNamespace(t, 'a');
    if (ns === undefined) return undefined;
    return { backbone: () => nats(ns.options()), cleanup: () => ns.cleanup() };
  },
  offers: { transactions: false, durable: true, balances: true, commandOwners: true },
});
