import { TidingsError } from '../../core/errors.ts';
import type { Queryable } from '../connection/driver.ts';
import { subscriptionStatements } from '../sql/subscriptions.ts';

/** A schema that was never migrated, or migrated by an older version, gets an error that says what to do. */
export async function explainMissingSchema<T>(schema: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    const code = (error as { code?: unknown }).code;
    if (code === '42P01' || code === '3F000') {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Schema ${schema} has no Tidings tables, or older ones (${(error as Error).message}): run "tidings migrate --schema ${schema}", or check --schema`,
        { cause: error },
      );
    }
    throw error;
  }
}

/** The error for a subscription the schema does not have, naming those it has. */
export async function unknownSubscription(db: Queryable, schema: string, name: string): Promise<TidingsError> {
  const { rows } = await db.query<{ name: string }>(subscriptionStatements(schema).names);
  const known = rows.map((row) => row.name);
  return new TidingsError(
    'INVALID_OPTIONS',
    `Schema ${schema} has no subscription ${name}; ${known.length === 0 ? 'it has none yet' : `it has ${known.join(', ')}`}`,
  );
}
