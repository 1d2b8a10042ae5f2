/** `tidings migrate [--dry-run]`: create or upgrade the schema, or print the SQL it would run. */
import type { Command } from 'commander';
import { appliedVersions, migrate, migrationScript, pendingMigrations } from 'tidings/postgres';
import { emit, globalsOf, type CliContext } from '../context.ts';
import { withDatabase } from '../database.ts';

export function registerMigrate(program: Command, context: CliContext): void {
  program
    .command('migrate')
    .description('create the schema, or upgrade it to this version of Tidings')
    .option(
      '--dry-run',
      'print the SQL it would run, change nothing (for a DBA to review, or to run with psql); with no database given, the SQL of a new schema',
    )
    .action(async (options: { dryRun?: boolean }, command: Command) => {
      if (options.dryRun === true) return migrateDryRun(context, command);
      await withDatabase(context, command, async (db, globals) => {
        const { applied } = await migrate(db.driver, globals.schema);
        emit(context, globals, { schema: globals.schema, applied }, () =>
          applied.length === 0
            ? `Schema ${globals.schema} is up to date.`
            : `Schema ${globals.schema}: applied migration${applied.length === 1 ? '' : 's'} ${applied.join(', ')}.`,
        );
      });
    });
}

/**
 * `migrate --dry-run`: the SQL `migrate` would run, as a script. With a database, only what it lacks (read
 * from its migrations table, nothing written); without one, everything, for a DBA preparing a new schema.
 */
async function migrateDryRun(context: CliContext, command: Command): Promise<void> {
  const globals = globalsOf(context, command);
  const show = (applied: ReadonlySet<number>) => {
    const pending = pendingMigrations(globals.schema, applied);
    if (globals.json) emit(context, globals, { schema: globals.schema, dryRun: true, pending }, () => '');
    else context.out(pending.length === 0 ? `-- Schema ${globals.schema} is up to date: nothing to run.\n` : migrationScript(globals.schema, applied));
  };
  if (globals.url === undefined) {
    if (!globals.json) context.err(`No database given: this is the SQL of a new schema ${globals.schema}. Give --url to see only what a database lacks.\n`);
    show(new Set());
    return;
  }
  await withDatabase(context, command, async (db) => show(await appliedVersions(db.driver, globals.schema)));
}
