/** Removing a subscription that is gone for good. */
import { TidingsError } from '../../core/errors.ts';
import type { SqlDriver } from '../connection/driver.ts';
import { subscriptionStatements } from '../sql/subscriptions.ts';
import { explainMissingSchema, unknownSubscription } from './schema.ts';

export interface DropSubscriptionResult {
  readonly subscription: string;
  /** Held messages and inbox records removed with it; its dead letters are kept (drop them apart). */
  readonly held: number;
  readonly inbox: number;
}

/**
 * Removes a subscription that is gone for good (renamed, or a command that moved to another owner): its
 * cursors, workers, held messages and inbox. Refused while a worker of it is alive: stop them first, or
 * they would register it again. Its dead letters stay, to inspect or drop.
 */
export async function dropSubscription(driver: SqlDriver, options: { schema: string; subscription: string }): Promise<DropSubscriptionResult> {
  const sql = subscriptionStatements(options.schema);
  return explainMissingSchema(options.schema, () =>
    driver.transaction(async (tx) => {
      const { rows: subs } = await tx.query(sql.lock, [options.subscription]);
      if (subs.length === 0) throw await unknownSubscription(tx, options.schema, options.subscription);
      const { rows: live } = await tx.query<{ id: string }>(sql.liveWorkers, [options.subscription]);
      if (live.length > 0) {
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Subscription ${options.subscription} has ${live.length} live worker${live.length === 1 ? '' : 's'} (${live.map((worker) => worker.id).join(', ')}): stop ${live.length === 1 ? 'it' : 'them'} first, or ${live.length === 1 ? 'it' : 'they'} would register it again`,
        );
      }
      const held = await tx.query(sql.deleteHeld, [options.subscription]);
      const inbox = await tx.query(sql.deleteInbox, [options.subscription]);
      await tx.query(sql.delete, [options.subscription]);
      return { subscription: options.subscription, held: held.rowCount ?? 0, inbox: inbox.rowCount ?? 0 };
    }),
  );
}
