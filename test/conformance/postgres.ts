import type { TestContext } from 'node:test';
import type { Backbone } from '../../src/index.ts';
import { postgres, type PgTransaction, type PostgresBackbone } from '../../src/postgres/index.ts';
import { quickPostgres } from '../fixtures/bus.ts';
import { recordEffect } from '../fixtures/effects.ts';
import { createEffects, DATABASE_URL, dropSchema, requirePostgres, sql, uniqueSchema } from '../helpers.ts';
import type { EffectStore, Namespace } from './suite.ts';

export { quickPostgres };

/** A fresh schema on the test server, with the effects table beside Tidings' tables. */
export async function postgresSchema(t: TestContext, prefix: string): Promise<{ schema: string; effects: EffectStore<PgTransaction> } | undefined> {
  if (!(await requirePostgres(t))) return undefined;
  const schema = uniqueSchema(prefix);
  await createEffects(schema);
  const effects: EffectStore<PgTransaction> = {
    write: (tx, message) => recordEffect(tx, schema, message),
    rows: () => sql(`select message_id as "messageId", key, seq from "${schema}".effects order by n`),
  };
  return { schema, effects };
}

/**
 * A broker's namespace with a PostgreSQL outbox of its own (schema `prefix`_...): `broker.backbone` is given
 * the outbox, and the namespace's effects are the outbox schema's; cleaning up drops the schema too.
 */
export async function withOutbox(
  t: TestContext,
  prefix: string,
  broker: { backbone(outbox: PostgresBackbone): Backbone<PgTransaction>; cleanup(): Promise<void> },
): Promise<Namespace<PgTransaction> | undefined> {
  const pg = await postgresSchema(t, prefix);
  if (pg === undefined) return undefined;
  return {
    backbone: () => broker.backbone(postgres({ url: DATABASE_URL, schema: pg.schema, ...quickPostgres })),
    effects: pg.effects,
    cleanup: async () => {
      await broker.cleanup();
      await dropSchema(pg.schema);
    },
  };
}
