/** `tidings drift status|check` and `tidings replica rebuild`: replicas of other services' data. */
import type { Command } from 'commander';
import { listReplicas, requestDriftCheck, requestRebuild, type DriftReport, type RebuildReport } from 'tidings/replica';
import { positiveNumber } from '../arguments.ts';
import type { GlobalOptions } from '../config.ts';
import { emit, showProgress, type CliContext } from '../context.ts';
import { withDatabase, type Database } from '../database.ts';
import { duration, withProgress } from '../format.ts';
import { renderReplicas } from '../status.ts';

export function registerReplicas(program: Command, context: CliContext): void {
  const drift = program.command('drift').description("replicas' drift from their sources: status, and a check (with repair) on demand");
  drift
    .command('status')
    .description('every replica with its generation, rows and last drift check')
    .action(async (_options, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const replicas = await listReplicas(db.driver, { schema: globals.schema });
        emit(context, globals, { replicas }, () => (replicas.length === 0 ? `No replicas in schema ${globals.schema}.` : renderReplicas(replicas)));
      });
    });
  drift
    .command('check')
    .description("ask a replica to compare itself with its source now and repair what differs; runs in the replica's process, over the bus")
    .argument('<replica>', 'the replica, for example credentials-gw1 (tidings drift status lists them)')
    .option('--timeout <seconds>', 'give up waiting for the report after this long', positiveNumber, 60)
    .action(async (name: string, options: { timeout: number }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const report = await requestDriftCheck(commandTo(name, db, globals, context, options.timeout));
        emit(context, globals, report, () => renderDrift(report));
      });
    });

  const replicaCommands = program
    .command('replica')
    .description("replicas of other services' data: rebuild one from its source (tidings drift for status and checks)");
  replicaCommands
    .command('rebuild')
    .description(
      'ask a replica to refill itself by state transfer from its source, over the bus, and follow its progress; readers see the previous table, whole, until the switch',
    )
    .argument('<replica>', 'the replica, for example credentials-gw1 (tidings drift status lists them)')
    .option('--timeout <seconds>', 'give up when the replica reports no progress for this long', positiveNumber, 60)
    .action(async (name: string, options: { timeout: number }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const report = await withProgress({ label: `Rebuilding ${name}`, enabled: showProgress(context, globals) }, (bar) =>
          requestRebuild({
            ...commandTo(name, db, globals, context, options.timeout),
            onProgress: ({ done, total }) => total !== null && bar.update(done, Math.max(total, done)),
          }),
        );
        emit(context, globals, report, () => renderRebuild(report));
      });
    });
}

/** A command to `replica`, sent over the bus at the global --url, its answer read from the database; Ctrl-C stops the wait. */
function commandTo(replica: string, db: Database, globals: GlobalOptions, context: CliContext, timeoutSeconds: number) {
  return { url: globals.url!, schema: globals.schema, replica, db: db.driver, timeoutMs: timeoutSeconds * 1_000, signal: context.interrupt };
}

function renderRebuild(report: RebuildReport): string {
  return `Replica ${report.replica} rebuilt: generation ${report.generation}, ${report.rows} rows from its source in ${duration(report.durationMs)} (${report.messages.sent + report.messages.received} messages).`;
}

function renderDrift(report: DriftReport): string {
  if (report.skipped !== undefined) return `Replica ${report.replica}: no check, ${report.skipped}.`;
  const found = report.missing + report.extra + report.different;
  const lines = [
    found === 0
      ? `Replica ${report.replica} matches its source.`
      : `Replica ${report.replica}: ${report.missing} missing, ${report.extra} extra, ${report.different} different; ${report.repaired} repaired.`,
    `${report.messages.sent + report.messages.received} messages (${report.messages.sent} requests, ${report.messages.received} replies), ${report.entries} hashes and keys, ${report.durationMs} ms; differing tree nodes per level: ${report.differingNodes.join(' / ') || '0'}.`,
  ];
  for (const kind of ['missing', 'extra', 'different'] as const) {
    if (report.samples[kind].length > 0)
      lines.push(`  ${kind}: ${report.samples[kind].join(', ')}${report[kind] > report.samples[kind].length ? ', ...' : ''}`);
  }
  return lines.join('\n');
}
