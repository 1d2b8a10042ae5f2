/** `tidings replay <subscription> --from <position|time> [--wait]`: handle a subscription's messages again. */
import type { Command } from 'commander';
import { readStatus, replaySubscription } from 'tidings/postgres';
import { parseFrom, type From } from '../arguments.ts';
import type { GlobalOptions } from '../config.ts';
import { CommandFailed, emit, pause, showProgress, type CliContext } from '../context.ts';
import { withDatabase, type Database } from '../database.ts';
import { withProgress } from '../format.ts';

export function registerReplay(program: Command, context: CliContext): void {
  program
    .command('replay')
    .description("handle a subscription's messages again from a log position or a time")
    .argument('<subscription>', 'the subscription to move back')
    .requiredOption('--from <position|time>', 'a log position (a whole number) or an ISO time such as 2026-01-31T12:00:00Z', parseFrom)
    .option('--wait', "wait until the subscription's workers have caught up, with a progress bar")
    .action(async (subscription: string, options: { from: From; wait?: boolean }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const result = await replaySubscription(db.driver, {
          schema: globals.schema,
          subscription,
          ...(options.from.kind === 'position' ? { fromPosition: options.from.position } : { fromTime: options.from.time }),
        });
        if (!globals.json || options.wait !== true) {
          emit(context, globals, result, () =>
            [
              `Replaying ${subscription} from position ${result.fromPosition}: ${result.messages} message${result.messages === 1 ? '' : 's'} to handle again across ${result.partitions} partition${result.partitions === 1 ? '' : 's'} (${result.inboxCleared} inbox record${result.inboxCleared === 1 ? '' : 's'} cleared).`,
              'Its workers drop their leases at once and take the partitions back from the new cursors on their next heartbeat.',
              ...(result.skipped > 0
                ? [
                    `Note: ${result.skipped} message${result.skipped === 1 ? '' : 's'} before position ${result.fromPosition} had not been handled yet and are skipped.`,
                  ]
                : []),
            ].join('\n'),
          );
        }
        if (options.wait !== true) return;
        const caughtUp = await waitForCatchUp(context, db, globals, subscription, result.messages);
        if (globals.json) emit(context, globals, { ...result, caughtUp }, () => '');
        if (!caughtUp) throw new CommandFailed(`Stopped waiting; the replay itself is done. Follow it with: tidings status --subscription ${subscription}`);
        if (!globals.json) context.out(`${subscription} has caught up.\n`);
      });
    });
}

async function waitForCatchUp(context: CliContext, db: Database, globals: GlobalOptions, subscription: string, total: number): Promise<boolean> {
  const first = await readStatus(db.driver, { schema: globals.schema, subscription });
  if (!globals.json && !first.subscriptions[0]?.workers.some((worker) => worker.live)) {
    context.err(`No live worker runs ${subscription} now: the replay happens when one starts. Ctrl-C stops waiting.\n`);
  }
  return withProgress({ label: 'Replaying', enabled: showProgress(context, globals) }, async (bar) => {
    for (;;) {
      const status = await readStatus(db.driver, { schema: globals.schema, subscription });
      const lag = status.subscriptions[0]?.lag ?? 0;
      bar.update(Math.max(0, total - lag), Math.max(total, lag));
      if (lag === 0) return true;
      if (context.interrupt.aborted) return false;
      await pause(context, 500);
    }
  });
}
