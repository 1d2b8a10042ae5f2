/**
 * The conformance suite (test/conformance/suite.ts) on RabbitMQ: with a PostgreSQL outbox (transactions,
 * inbox, exactly-once effects) and alone. RabbitMQ's single active consumer hands a partition queue to one
 * worker at a time: a second worker takes over, it does not share (offers.balances is false).
 */
import type { TestContext } from 'node:test';
import { conformance } from './conformance/suite.ts';
import { withOutbox } from './conformance/postgres.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { RABBITMQ_URL, requireBroker, uniqueSchema } from './helpers.ts';
import { deleteByPrefix, testOptions } from './fixtures/rabbitmq.ts';

async function prefix(t: TestContext, name: string): Promise<string | undefined> {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return undefined;
  return `${uniqueSchema(name)}.`;
}

conformance<PgTransaction>({
  name: 'rabbitmq with a postgres outbox',
  namespace: async (t) => {
    const p = await prefix(t, 'rc');
    if (p === undefined) return undefined;
    return withOutbox(t, 'rabbit', { backbone: (outbox) => rabbitmq({ ...testOptions(p), outbox }), cleanup: () => deleteByPrefix(p) });
  },
  offers: { transactions: true, durable: true, balances: true, commandOwners: true },
});

conformance<PgTransaction>({
  name: 'rabbitmq alone (no outbox: no transactions)',
  namespace: async (t) => {
    const p = await prefix(t, 'ra');
    if (p === undefined) return undefined;
    return { backbone: () => rabbitmq(testOptions(p)), cleanup: () => deleteByPrefix(p) };
  },
  offers: { transactions: false, durable: true, balances: true, commandOwners: true },
});
