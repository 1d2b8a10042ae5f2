/**
 * The conformance suite (test/conformance/suite.ts) on NATS JetStream with a PostgreSQL outbox: the same
 * application code as on PostgreSQL, transactions and exactly-once effects included.
 */
import { conformance } from './conformance/suite.ts';
import { withOutbox } from './conformance/postgres.ts';
import { nats } from '../src/nats/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { natsNamespace } from './fixtures/nats.ts';

conformance<PgTransaction>({
  name: 'nats with a postgres outbox',
  namespace: async (t) => {
    const ns = await natsNamespace(t, 'c');
    if (ns === undefined) return undefined;
    return withOutbox(t, 'nats', { backbone: (outbox) => nats(ns.options({ outbox })), cleanup: () => ns.cleanup() });
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
