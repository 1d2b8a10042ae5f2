/** The conformance suite on the PostgreSQL backbone, against the test server. */
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { DATABASE_URL, dropSchema } from './helpers.ts';
import { postgresSchema, quickPostgres } from './conformance/postgres.ts';
import { conformance } from './conformance/suite.ts';

conformance<PgTransaction>({
  name: 'postgres',
  offers: { transactions: true, durable: true, balances: true, commandOwners: true },
  async namespace(t) {
    const world = await postgresSchema(t, 'cp');
    if (world === undefined) return undefined;
    return {
      backbone: () => postgres({ url: DATABASE_URL, schema: world.schema, ...quickPostgres }),
      effects: world.effects,
      cleanup: () => dropSchema(world.schema),
    };
  },
});
