/** `tidings prune`: run retention once. */
import type { Command } from 'commander';
import { prune } from 'tidings/postgres';
import { positiveNumber } from '../arguments.ts';
import { CommandFailed, emit, type CliContext } from '../context.ts';
import { withDatabase } from '../database.ts';

export function registerPrune(program: Command, context: CliContext): void {
  program
    .command('prune')
    .description('run retention once: delete handled log rows, inbox records and dead letters older than their windows')
    .option('--log-days <days>', 'keep log rows this many days (default 7)', positiveNumber)
    .option('--inbox-days <days>', 'keep inbox records (the de-duplication window) this many days (default 14)', positiveNumber)
    .option('--dead-letter-days <days>', 'keep dead letters this many days (default 30)', positiveNumber)
    .option('--force', 'also delete old log rows a subscription has not handled yet (it will never see them)')
    .option('--dry-run', 'count what would be deleted, delete nothing')
    .action(async (options: { logDays?: number; inboxDays?: number; deadLetterDays?: number; force?: boolean; dryRun?: boolean }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const ms = (days: number | undefined) => (days === undefined ? undefined : Math.round(days * 86_400_000));
        const result = await prune(db.driver, {
          schema: globals.schema,
          log: { maxAgeMs: ms(options.logDays), force: options.force === true },
          inbox: { maxAgeMs: ms(options.inboxDays) },
          deadLetters: { maxAgeMs: ms(options.deadLetterDays) },
          dryRun: options.dryRun === true,
          signal: context.interrupt,
        });
        emit(context, globals, result, () =>
          [
            `${result.dryRun ? 'Would delete' : 'Deleted'} ${result.log.deleted} log rows, ${result.inbox.deleted} inbox records and ${result.deadLetters.deleted} dead letters (${result.statements} statements, ${result.ms} ms).`,
            ...(result.log.kept > 0 ? [`Kept ${result.log.kept} old log rows that a subscription has not handled yet (--force deletes them).`] : []),
          ].join('\n'),
        );
        if (result.stopped) throw new CommandFailed('Stopped before the end; run the same command again to continue.');
      });
    });
}
