/** `tidings tenants list|show|suspend|resume|purge|export`: one tenant's usage, delivery, data and erasure. */
import { createWriteStream } from 'node:fs';
import { once } from 'node:events';
import type { Command } from 'commander';
import { exportTenant, listTenants, purgeTenant, resumeTenant, showTenant, suspendTenant } from 'tidings/postgres';
import type { GlobalOptions } from '../config.ts';
import { CommandFailed, emit, settingsOf, type CliContext } from '../context.ts';
import { withDatabase, withDatabaseAt } from '../database.ts';
import { shortTime, table } from '../format.ts';
import { acrossStamps, emitStamps, readStamps } from '../stamps.ts';

const ACTOR = ['--actor <name>', 'who does this, for the audit table (default: OS user@host)'] as const;

export function registerTenants(program: Command, context: CliContext): void {
  const tenants = program.command('tenants').description("tenants: usage for billing, suspend and resume delivery, export and purge a tenant's data");
  tenants
    .command('list')
    .description('every tenant with messages in the log or a suspension on record')
    .action(async (_options: unknown, command: Command) => {
      const settings = settingsOf(context, command);
      if (acrossStamps(settings)) return listEveryStamp(context, settings);
      await withDatabase(context, command, async (db, globals) => {
        const found = await listTenants(db.driver, { schema: globals.schema });
        emit(context, globals, { tenants: found }, () => {
          if (found.length === 0) return 'No tenants: no message in the log carries one.';
          return `${table(
            found,
            [
              { header: 'tenant', value: (row) => row.tenant, max: 40, shrink: 1 },
              { header: 'messages', value: (row) => row.messages },
              { header: 'last message', value: (row) => (row.lastMessageAt === undefined ? '-' : shortTime(row.lastMessageAt)) },
              { header: 'delivery', value: (row) => (row.suspendedAt === undefined ? 'flowing' : `suspended ${shortTime(row.suspendedAt)}`) },
            ],
            { width: context.columns },
          )}\nShow one with: tidings tenants show <tenant>`;
        });
      });
    });
  tenants
    .command('show')
    .description("one tenant's usage (messages and bytes published, handled per subscription, dead letters, waiting) and its last actions")
    .argument('<tenant>')
    .action(async (tenant: string, _options: unknown, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const found = await showTenant(db.driver, { schema: globals.schema, tenant });
        emit(context, globals, found, () =>
          [
            `Tenant ${found.tenant}: ${found.suspendedAt === undefined ? 'delivery flowing' : `suspended ${shortTime(found.suspendedAt)} by ${found.suspendedBy}${found.reason === undefined ? '' : ` (${found.reason})`}`}`,
            `  published   ${found.messages} messages, ${found.bytes} bytes of data${found.lastMessageAt === undefined ? '' : `, the last ${shortTime(found.lastMessageAt)}`}`,
            ...Object.entries(found.handled).map(([subscription, n]) => `  handled     ${n} by ${subscription}`),
            `  waiting     ${found.held} held, ${found.scheduled} scheduled`,
            `  dead        ${found.deadLetters} dead letters`,
            `  sagas       ${found.sagas} instances`,
            ...Object.entries(found.replicas).map(([replica, n]) => `  replica     ${n} rows in ${replica}`),
            ...(found.quota === undefined
              ? []
              : [`  quota       ${found.quota.tokens.toFixed(1)} tokens left by its last publish, ${shortTime(found.quota.at)}`]),
            ...(found.actions.length === 0
              ? []
              : ['', 'Last actions:', ...found.actions.map((action) => `  ${shortTime(action.at)} ${action.action} by ${action.actor}`)]),
          ].join('\n'),
        );
      });
    });
  tenants
    .command('suspend')
    .description("hold a tenant's messages (each key's order kept) while the others flow; publishing for it still works")
    .argument('<tenant>')
    .option('--reason <text>', 'why, kept with the suspension and in the audit table')
    .option(...ACTOR)
    .action(async (tenant: string, options: { reason?: string; actor?: string }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const result = await suspendTenant(db.driver, { schema: globals.schema, tenant, reason: options.reason, actor: options.actor });
        emit(context, globals, result, () =>
          result.suspended
            ? `Suspended ${tenant}: its messages wait from the workers' next batch on. Resume with: tidings tenants resume ${tenant}`
            : `${tenant} was suspended already.`,
        );
      });
    });
  tenants
    .command('resume')
    .description("deliver a suspended tenant's messages again: those that waited first, in their keys' order")
    .argument('<tenant>')
    .option(...ACTOR)
    .action(async (tenant: string, options: { actor?: string }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const result = await resumeTenant(db.driver, { schema: globals.schema, tenant, actor: options.actor });
        if (!result.resumed) throw new CommandFailed(`${tenant} is not suspended. See which are with: tidings tenants list`);
        emit(context, globals, result, () => `Resumed ${tenant}: ${result.released} waiting keys are due now.`);
      });
    });
  tenants
    .command('purge')
    .description('delete every row Tidings keeps of a tenant (log, inbox, held, dead letters, scheduled, sagas, replies), with an audit row; suspend it first')
    .argument('<tenant>')
    .option('--dry-run', 'count the rows per table, delete nothing')
    .option('--yes', 'really delete (required without --dry-run)')
    .option(...ACTOR)
    .action(async (tenant: string, options: { dryRun?: boolean; yes?: boolean; actor?: string }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const dryRun = options.dryRun === true;
        if (!dryRun && options.yes !== true) {
          throw new CommandFailed(`Purging ${tenant} deletes its rows for good: see what it would delete with --dry-run, then run it again with --yes`);
        }
        const result = await purgeTenant(db.driver, { schema: globals.schema, tenant, dryRun, actor: options.actor });
        const total = Object.values(result.rows).reduce((sum, n) => sum + n, 0);
        // Replicas' tables (replica_<name>_g<n>) are longer than Tidings' own names.
        const width = Math.max(17, ...Object.keys(result.rows).map((name) => name.length + 1));
        emit(context, globals, result, () =>
          [
            `${dryRun ? 'Would delete' : 'Deleted'} ${total} rows of tenant ${tenant}:`,
            ...Object.entries(result.rows).map(([name, n]) => `  ${name.padEnd(width)} ${n}`),
            ...(dryRun ? [`Delete them with: tidings tenants purge ${tenant} --yes`] : ['Recorded in tenant_actions.']),
          ].join('\n'),
        );
      });
    });
  tenants
    .command('export')
    .description("a tenant's messages, oldest first, as CloudEvents in NDJSON (one JSON object a line)")
    .argument('<tenant>')
    .option('--out <file>', 'write to this file instead of standard output')
    .option(...ACTOR)
    .action(async (tenant: string, options: { out?: string; actor?: string }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const file = options.out === undefined ? undefined : createWriteStream(options.out);
        const write = async (line: string) => {
          if (file === undefined) context.out(line);
          else if (!file.write(line)) await once(file, 'drain');
        };
        let count = 0;
        try {
          for await (const envelope of exportTenant(db.driver, { schema: globals.schema, tenant, actor: options.actor })) {
            if (context.interrupt.aborted) throw new CommandFailed(`Stopped after ${count} messages.`);
            await write(`${JSON.stringify(envelope)}\n`);
            count++;
          }
        } finally {
          if (file !== undefined) {
            file.end();
            await once(file, 'close');
          }
        }
        if (file !== undefined) context.err(`Exported ${count} messages of ${tenant} to ${options.out}.\n`);
      });
    });
}

/** `tidings tenants list` on every stamp: JSON keyed by stamp (each `{tenants}`); for a person, one table with a stamp column. */
async function listEveryStamp(context: CliContext, settings: GlobalOptions): Promise<void> {
  const readings = await readStamps(settings, (globals) =>
    withDatabaseAt(globals, async (db) => ({ tenants: await listTenants(db.driver, { schema: globals.schema }) })),
  );
  emitStamps(context, settings, readings, () => {
    const rows = readings.flatMap((reading) => ('error' in reading ? [] : reading.value.tenants.map((row) => ({ ...row, stamp: reading.tenant }))));
    const failures = readings.flatMap((reading) => ('error' in reading ? [`stamp ${reading.tenant}: cannot read: ${reading.error.message}`] : []));
    const shown =
      rows.length === 0
        ? 'No tenants: no message in any stamp carries one.'
        : table(
            rows,
            [
              { header: 'stamp', value: (row) => row.stamp },
              { header: 'tenant', value: (row) => row.tenant, max: 40, shrink: 1 },
              { header: 'messages', value: (row) => row.messages },
              { header: 'last message', value: (row) => (row.lastMessageAt === undefined ? '-' : shortTime(row.lastMessageAt)) },
              { header: 'delivery', value: (row) => (row.suspendedAt === undefined ? 'flowing' : `suspended ${shortTime(row.suspendedAt)}`) },
            ],
            { width: context.columns },
          );
    return [shown, ...failures].join('\n');
  });
}
