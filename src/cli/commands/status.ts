/** `tidings status [--subscription s] [--verbose] [--watch]`: lag, held keys, dead letters, leases, replicas. */
import type { Command } from 'commander';
import { readStatus } from 'tidings/postgres';
import { listReplicas } from 'tidings/replica';
import { positiveNumber } from '../arguments.ts';
import type { GlobalOptions } from '../config.ts';
import { emit, pause, settingsOf, type CliContext } from '../context.ts';
import { type Database, withDatabase, withDatabaseAt } from '../database.ts';
import { plain, styleFor } from '../format.ts';
import { acrossStamps, emitStamps, readStamps, sections } from '../stamps.ts';
import { renderReplicas, renderStatus, type StatusView } from '../status.ts';

export function registerStatus(program: Command, context: CliContext): void {
  program
    .command('status')
    .description('subscriptions with their lag, held keys and dead letters; partitions and leases where something needs a look')
    .option('--subscription <name>', 'only this subscription')
    .option('--verbose', 'every partition (owner, lease, epoch, lag) and every worker, not only those in trouble')
    .option('--watch [seconds]', 'show it again every few seconds (2 unless given) until Ctrl-C; with --json, one object per line', positiveNumber)
    .action(async (options: { subscription?: string; verbose?: boolean; watch?: number | true }, command: Command) => {
      const settings = settingsOf(context, command);
      if (acrossStamps(settings) && options.watch === undefined) return statusOfEveryStamp(context, settings, options);
      await withDatabase(context, command, async (db, globals) => {
        const view = viewOf(context, globals, options);
        const read = () => readOne(db, globals.schema, options.subscription, view);
        if (options.watch === undefined) {
          const { value, text } = await read();
          emit(context, globals, value, text);
          return;
        }
        const everyMs = (options.watch === true ? 2 : options.watch) * 1_000;
        while (!context.interrupt.aborted) {
          const { value, text } = await read();
          if (globals.json) context.out(`${JSON.stringify(value)}\n`);
          // On a terminal the screen is redrawn in place; into a file or a pipe, each reading follows the last.
          else
            context.out(
              `${context.stdoutIsTTY ? '\x1b[H\x1b[2J' : '\n'}${text()}\n${context.stdoutIsTTY ? `\nEvery ${everyMs / 1_000} s; Ctrl-C to stop.\n` : ''}`,
            );
          await pause(context, everyMs);
        }
      });
    });
}

/** `tidings status` with stamps configured and no --stamp: each tenant's status under its name. */
async function statusOfEveryStamp(context: CliContext, settings: GlobalOptions, options: { subscription?: string; verbose?: boolean }): Promise<void> {
  const view = viewOf(context, settings, options);
  const readings = await readStamps(settings, (globals) => withDatabaseAt(globals, (db) => readOne(db, globals.schema, options.subscription, view)));
  const forJson = readings.map((reading) => ('error' in reading ? reading : { ...reading, value: reading.value.value }));
  emitStamps(context, settings, forJson, () => sections(readings, (one) => one.text()));
}

function viewOf(context: CliContext, globals: GlobalOptions, options: { verbose?: boolean }): StatusView {
  return { verbose: options.verbose === true, width: context.columns, style: globals.json ? plain : styleFor(context.stdoutIsTTY, context.env) };
}

/** One place's status and replicas: the value --json prints, and the text for a person. */
async function readOne(db: Database, schema: string, subscription: string | undefined, view: StatusView): Promise<{ value: unknown; text: () => string }> {
  const status = await readStatus(db.driver, { schema, subscription });
  const replicas = subscription === undefined ? await listReplicas(db.driver, { schema }) : [];
  return {
    value: replicas.length === 0 ? status : { ...status, replicas },
    text: () => [renderStatus(status, db.description, view), ...(replicas.length === 0 ? [] : ['', renderReplicas(replicas)])].join('\n'),
  };
}
