/** `tidings subscriptions drop <name>`: remove a subscription gone for good. */
import type { Command } from 'commander';
import { dropSubscription } from 'tidings/postgres';
import { emit, type CliContext } from '../context.ts';
import { withDatabase } from '../database.ts';

export function registerSubscriptions(program: Command, context: CliContext): void {
  program
    .command('subscriptions')
    .description('subscriptions gone for good')
    .command('drop')
    .description('remove a subscription with no live worker: its cursors, held messages and inbox (its dead letters stay)')
    .argument('<subscription>', 'the subscription to remove')
    .action(async (subscription: string, _options: unknown, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const result = await dropSubscription(db.driver, { schema: globals.schema, subscription });
        emit(
          context,
          globals,
          result,
          () =>
            `Dropped ${subscription} (${result.held} held message${result.held === 1 ? '' : 's'}, ${result.inbox} inbox record${result.inbox === 1 ? '' : 's'}); its dead letters stay.`,
        );
      });
    });
}
