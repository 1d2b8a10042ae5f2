/** `tidings status [--subscription s] [--verbose] [--watch]`: lag, held keys, dead letters, leases, replicas. */
import type { Command } from 'commander';
import { readStatus } from 'tidings/postgres';
import { listReplicas } from 'tidings/replica';
import { positiveNumber } from '../arguments.ts';
import type { GlobalOptions } from '../config.ts';
import { emit, pause, settingsOf, type CliContext } from '../context.ts';
import { withDatabase, withDatabaseAt } from '../database.ts';
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
        const view: StatusView = {
          verbose: options.verbose === true,
          width: context.columns,
          style: globals.json ? plain : styleFor(context.stdoutIsTTY, context.env),
        };
        const read = async () => {
          const status = await readStatus(db.driver, { schema: globals.schema, subscription: options.subscription });
          const replicas = options.subscription === undefined ? await listReplicas(db.driver, { schema: globals.schema }) : [];
          const value = replicas.length === 0 ? status : { ...status, replicas };
          const text = () => [renderStatus(status, db.description, view), ...(replicas.length === 0 ? [] : ['', renderReplicas(replicas)])].join('\n');
          return { value, text };
        };
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
  const readings = await readStamps(settings, (globals) =>
    withDatabaseAt(globals, async (db) => {
      const status = await readStatus(db.driver, { schema: globals.schema, subscription: options.subscription });
      const replicas = options.subscription === undefined ? await listReplicas(db.driver, { schema: globals.schema }) : [];
      return { status, replicas, description: db.description };
    }),
  );
  const view: StatusView = {
    verbose: options.verbose === true,
    width: context.columns,
    style: settings.json ? plain : styleFor(context.stdoutIsTTY, context.env),
  };
  const forJson = readings.map((reading) =>
    'error' in reading
      ? reading
      : { ...reading, value: reading.value.replicas.length === 0 ? reading.value.status : { ...reading.value.status, replicas: reading.value.replicas } },
  );
  emitStamps(context, settings, forJson, () =>
    sections(readings, ({ status, replicas, description }) =>
      [renderStatus(status, description, view), ...(replicas.length === 0 ? [] : ['', renderReplicas(replicas)])].join('\n'),
    ),
  );
}
