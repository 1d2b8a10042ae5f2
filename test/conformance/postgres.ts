import type { TestContext } from 'node:test';
import type { PgTransaction } from '../../src/postgres/index.ts';
import { connect, createEffects, requirePostgres, uniqueSchema } from '../helpers.ts';
import type { EffectStore } from './suite.ts';

export { quickPostgres } from '../fixtures/bus.ts';

/** A fresh schema on the test server, with the effects table beside Tidings' tables. */
export async function postgresSchema(t: TestContext, prefix: string): Promise<{ schema: string; effects: EffectStore<PgTransaction> } | undefined> {
  if (!(await requirePostgres(t))) return undefined;
  const schema = uniqueSchema(prefix);
  await createEffects(schema);
  const effects: EffectStore<PgTransaction> = {
    write: async (tx, message) => {
      await tx.query(`insert into "${schema}".effects (message_id, key, seq, worker) values ($1, $2, $3, 0)`, [message.id, message.data.key, message.data.seq]);
    },
    rows: async () => {
      const client = await connect();
      try {
        const { rows } = await client.query(`select message_id as "messageId", key, seq from "${schema}".effects order by n`);
        return rows;
      } finally {
        await client.end();
      }
    },
  };
  return { schema, effects };
}
