/**
 * The conformance suite (test/conformance/suite.ts) on RabbitMQ: with a PostgreSQL outbox (transactions,
 * inbox, exactly-once effects) and alone. RabbitMQ's single active consumer hands a partition queue to one
 * worker at a time: a second worker takes over, it does not share (offers.balances is false).
 */
import type { TestContext } from 'node:test';
import { conformance } from './conformance/suite.ts';
import { postgresSchema, quickPostgres } from './conformance/postgres.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { DATABASE_URL, dropSchema, RABBITMQ_URL, requireBroker, uniqueSchema } from './helpers.ts';
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
    const pg = await postgresSchema(t, 'rabbit');
    if (pg === undefined) return undefined;
    return {
      backbone: () => rabbitmq({ ...testOptions(p), outbox: postgres({ url: DATABASE_URL, schema: pg.schema, ...quickPostgres }) }),
      effects: pg.effects,
      cleanup: async () => {
        await deleteByPrefix(p);
        await dropSchema(pg.schema);
      },
    };
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
