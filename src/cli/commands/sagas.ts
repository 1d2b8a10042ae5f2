/** `tidings sagas list|show`: saga instances, and one whole with its transitions and pending timeouts. */
import type { Command } from 'commander';
import { listSagas, showSaga } from 'tidings/postgres';
import { positiveInteger } from '../arguments.ts';
import { CommandFailed, emit, type CliContext } from '../context.ts';
import { withDatabase } from '../database.ts';
import { shortTime, table } from '../format.ts';

export function registerSagas(program: Command, context: CliContext): void {
  const sagas = program.command('sagas').description('saga instances: list them, show one with its transitions and pending timeouts');
  sagas
    .command('list')
    .description('instances, the most recently changed first')
    .option('--saga <name>', 'only instances of this saga')
    .option('--active', 'only running instances')
    .option('--completed', 'only completed instances')
    .option('--limit <count>', 'show at most this many', positiveInteger, 50)
    .action(async (options: { saga?: string; active?: boolean; completed?: boolean; limit: number }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const status = options.active === true ? 'active' : options.completed === true ? 'completed' : undefined;
        const found = await listSagas(db.driver, { schema: globals.schema, saga: options.saga, status, limit: options.limit });
        emit(context, globals, found, () => {
          if (found.total === 0) return 'No saga instances.';
          const shown = table(
            found.sagas,
            [
              { header: 'saga', value: (row) => row.saga },
              { header: 'id', value: (row) => row.id, max: 40, shrink: 1 },
              { header: 'version', value: (row) => row.version },
              { header: 'state', value: (row) => (row.completed ? 'completed' : 'active') },
              { header: 'started', value: (row) => shortTime(row.startedAt) },
              { header: 'changed', value: (row) => shortTime(row.updatedAt) },
            ],
            { width: context.columns },
          );
          return `${shown}${found.total > found.sagas.length ? `\n${found.sagas.length} of ${found.total} shown.` : ''}\nShow one with: tidings sagas show <saga> <id>`;
        });
      });
    });
  sagas
    .command('show')
    .description('one instance whole: state, version, each transition with the message that caused it, pending timeouts')
    .argument('<saga>', 'the saga, for example billing.payment')
    .argument('<id>', "the instance's correlation id")
    .action(async (saga: string, id: string, _options: unknown, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const found = await showSaga(db.driver, { schema: globals.schema, saga, id });
        if (found === undefined)
          throw new CommandFailed(`No instance ${id} of saga ${saga} in schema ${globals.schema}. List them with: tidings sagas list --saga ${saga}`);
        emit(context, globals, found, () =>
          [
            `Saga ${found.saga} instance ${found.id}: version ${found.version}, ${found.completed ? 'completed' : 'active'}, started ${shortTime(found.startedAt)}`,
            '',
            'State:',
            JSON.stringify(found.state, null, 2).replace(/^/gm, '  '),
            '',
            `Transitions (${found.transitions.length}):`,
            ...found.transitions.map((step) => `  v${step.version} at ${shortTime(step.at)}: ${step.topic} (message ${step.messageId})`),
            '',
            found.pendingTimeouts.length === 0 ? 'No pending timeouts.' : `Pending timeouts (${found.pendingTimeouts.length}):`,
            ...found.pendingTimeouts.map((timeout) => `  ${timeout.name} due ${shortTime(timeout.dueAt)} (message ${timeout.messageId})`),
          ].join('\n'),
        );
      });
    });
}
