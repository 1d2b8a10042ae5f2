/**
 * The `tidings` commands. Each opens the database, calls one function of src/postgres/admin.ts, and shows
 * the result: an aligned table for a person, or JSON with `--json` for a script. Failures become exit
 * codes in main.ts; nothing here exits the process.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { TidingsError } from '../core/errors.ts';
import type { Backbone } from '../core/backbone.ts';
import { groupDeadLetters, type DeadLetterActionResult, type DeadLetterGroup, type DeadLetterSelection, type DeadLetterStore } from '../core/dead-letters.ts';
import { adminDefaults, deadLetterStore, dropSubscription, firstPositionAt, readStatus, replaySubscription, tailTopic, type Status } from '../postgres/admin.ts';
import { checkIdentifier } from '../postgres/driver.ts';
import { migrate } from '../postgres/migrate.ts';
import { prune } from '../postgres/retention.ts';
import { listReplicas, requestDriftCheck, requestRebuild, type ReplicaStatus } from '../replica/admin.ts';
import type { DriftReport, RebuildReport } from '../replica/define.ts';
import { isUnreachable, openDatabase, unreachableMessage, type Database } from './database.ts';
import { duration, lease, progress, table } from './format.ts';

/** What scripts can rely on. Also listed in `tidings --help`. */
export const exitCodes = {
  ok: 0,
  /** The operation ran and failed: an error from the database, nothing found, stopped half-way. */
  failed: 1,
  /** The command line was wrong: unknown command or option, bad value, missing selection. */
  usage: 2,
  /** The database could not be reached, refused the login, or does not exist. */
  unreachable: 3,
} as const;

/** A command ran and did not succeed (nothing matched, interrupted): exit code 1, with what to do next. */
export class CommandFailed extends Error {
  override name = 'CommandFailed';
}

export interface CliContext {
  readonly env: NodeJS.ProcessEnv;
  /** Aborted by Ctrl-C: long operations stop between steps and say how far they got. */
  readonly interrupt: AbortSignal;
  readonly stdoutIsTTY: boolean;
  readonly out: (text: string) => void;
  readonly err: (text: string) => void;
}

interface GlobalOptions {
  url?: string;
  schema: string;
  json: boolean;
  connectTimeout: number;
}

const HELP_AFTER = `
Exit codes:
  0  success
  1  the operation failed (an error from the database, nothing found, stopped half-way)
  2  usage error (unknown command or option, a bad value, no dead letters named)
  3  the database is unreachable (not running, wrong host or port, login refused, no such database)

Environment:
  DATABASE_URL  the database when --url is not given

Examples:
  tidings status
  tidings tail orders.order-placed --key o-42
  tidings dead-letters list --group
  tidings dead-letters redrive --subscription billing --error "gateway timeout" --rate 50
  tidings dead-letters list --url amqp://guest:guest@localhost:5672 --prefix shop.
  tidings replay billing --from 2026-01-31T12:00:00Z --wait
  tidings prune --dry-run
  tidings drift check credentials-gw1
  tidings replica rebuild credentials-gw1`;

export function buildProgram(context: CliContext): Command {
  const program = new Command('tidings')
    .description('Operate Tidings: schema, status and lag, live tail, dead letters (on PostgreSQL, RabbitMQ or NATS), replay, retention, replicas.')
    .exitOverride()
    .configureOutput({ writeOut: context.out, writeErr: context.err })
    .showHelpAfterError('(add --help for usage)')
    .addOption(new Option('--url <url>', 'PostgreSQL connection URL (default: $DATABASE_URL); the dead-letters commands also take amqp:// and nats:// URLs'))
    .addOption(new Option('--schema <name>', "schema of Tidings' tables").default('tidings').argParser(parseSchema))
    .addOption(new Option('--json', 'print JSON for scripts instead of tables').default(false))
    .addOption(new Option('--connect-timeout <seconds>', 'give up connecting after this long').default(10).argParser(positiveNumber))
    .addHelpText('after', HELP_AFTER);

  program
    .command('migrate')
    .description('create the schema, or upgrade it to this version of Tidings')
    .action(async (_options, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const { applied } = await migrate(db.driver, globals.schema);
        emit(context, globals, { schema: globals.schema, applied }, () =>
          applied.length === 0
            ? `Schema ${globals.schema} is up to date.`
            : `Schema ${globals.schema}: applied migration${applied.length === 1 ? '' : 's'} ${applied.join(', ')}.`,
        );
      });
    });

  program
    .command('status')
    .description('subscriptions with their lag per partition, leases, workers, held keys and dead letters')
    .option('--subscription <name>', 'only this subscription')
    .action(async (options: { subscription?: string }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const status = await readStatus(db.driver, { schema: globals.schema, subscription: options.subscription });
        const replicas = options.subscription === undefined ? await listReplicas(db.driver, { schema: globals.schema }) : [];
        emit(context, globals, replicas.length === 0 ? status : { ...status, replicas }, () =>
          [renderStatus(status, db.description), ...(replicas.length === 0 ? [] : ['', renderReplicas(replicas)])].join('\n'),
        );
      });
    });

  program
    .command('tail')
    .description('follow the messages of a topic as they are committed (Ctrl-C to stop)')
    .argument('<topic>', 'the topic (contract name), for example orders.order-placed')
    .option('--key <key>', 'only messages with this partition key')
    .option('--type <type>', 'only messages of this CloudEvents type, for example orders.order-placed.v2')
    .option('--tenant <tenant>', 'only messages of this tenant')
    .option('--grep <text>', "only messages whose data's JSON contains this text (any case)")
    .option('--from <position|time>', 'begin at a log position or an ISO time instead of now', parseFrom)
    .option('--limit <count>', 'stop after this many messages', positiveInteger)
    .action(async (topic: string, options: TailCommandOptions, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const fromPosition = options.from === undefined ? undefined : await positionOf(db, globals.schema, options.from, [topic]);
        if (!globals.json) context.err(`Following ${topic} in schema ${globals.schema} at ${db.description} (Ctrl-C to stop)\n`);
        const stop = new AbortController();
        const onInterrupt = () => stop.abort();
        context.interrupt.addEventListener('abort', onInterrupt, { once: true });
        let count = 0;
        try {
          for await (const { position, envelope } of tailTopic(db.driver, {
            schema: globals.schema,
            topic,
            key: options.key,
            type: options.type,
            tenant: options.tenant,
            grep: options.grep,
            fromPosition,
            signal: stop.signal,
          })) {
            if (globals.json) context.out(`${JSON.stringify({ position, ...envelope })}\n`);
            else {
              const extra = [envelope.tenant === undefined ? '' : `tenant=${envelope.tenant}`, envelope.subject === undefined ? '' : `subject=${envelope.subject}`];
              context.out(`#${position}  ${shortTime(envelope.time)}  ${envelope.type}  key=${envelope.partitionkey}  id=${envelope.id}  ${extra.filter(Boolean).join('  ')}${extra.some(Boolean) ? '  ' : ''}${JSON.stringify(envelope.data)}\n`);
            }
            if (options.limit !== undefined && ++count >= options.limit) break;
          }
        } finally {
          context.interrupt.removeEventListener('abort', onInterrupt);
        }
      });
    });

  const deadLetters = program.command('dead-letters').description('messages a subscription gave up on: list, show, redrive, drop');

  addSelection(deadLetters.command('list').description('list dead letters, oldest first, or --group them by error'))
    .option('--limit <count>', 'show at most this many rows', positiveInteger, 50)
    .option('--group', 'one row per subscription and error (numbers and ids masked), largest first')
    .action(async (options: SelectionOptions & { limit: number; group?: boolean }, command: Command) => {
      await withDeadLetters(context, command, async (store, globals) => {
        const selection = selectionOf([], options);
        if (options.group === true) {
          const groups = await groupOf(store, { ...selection, limit: options.limit });
          emit(context, globals, groups, () => (groups.length === 0 ? 'No dead letters.' : renderGroups(groups)));
          return;
        }
        const { total, deadLetters: rows } = await store.list({ ...selection, limit: options.limit });
        emit(context, globals, { total, deadLetters: rows }, () => {
          if (total === 0) return 'No dead letters.';
          const shown = table(rows, [
            { header: 'id', value: (row) => row.id, align: 'right' },
            { header: 'subscription', value: (row) => row.subscription },
            { header: 'topic', value: (row) => row.topic },
            { header: 'key', value: (row) => row.key, max: 24 },
            { header: 'attempts', value: (row) => row.attempts },
            { header: 'dead at', value: (row) => shortTime(row.deadAt) },
            { header: 'reason', value: (row) => row.reason, max: 80 },
          ]);
          const more = total > rows.length ? `\n${rows.length} of ${total} shown: narrow the selection or raise --limit.` : '';
          return `${shown}${more}\nShow one with: tidings dead-letters show <id>`;
        });
      });
    });

  addBrokerOptions(deadLetters.command('show'))
    .description('one dead letter in full: envelope with data, and every attempt with its stack')
    .argument('<id>', 'a dead-letter id (from list) or a message id')
    .action(async (id: string, _options, command: Command) => {
      await withDeadLetters(context, command, async (store, globals, where) => {
        const found = await store.show(id);
        if (found.length === 0) throw new CommandFailed(`No dead letter ${id} in ${where}. List them with: tidings dead-letters list`);
        // Always a list in JSON: a message id can name dead letters of several subscriptions.
        emit(context, globals, found, () =>
          found
            .map((letter) => {
              const head = [
                `Dead letter ${letter.id} of subscription ${letter.subscription}`,
                `  message   ${letter.messageId}`,
                `  topic     ${letter.topic}${typeof letter.envelope.type === 'string' ? ` (${letter.envelope.type})` : ''}`,
                `  key       ${letter.key}`,
                `  position  ${letter.position ?? '-'}`,
                `  dead at   ${shortTime(letter.deadAt)}`,
                `  reason    ${letter.reason}`,
                '',
                'Envelope:',
                indent(JSON.stringify(letter.envelope, null, 2), '  '),
                '',
                `Attempts (${letter.attempts.length}):`,
              ];
              const attempts = letter.attempts.map((attempt) =>
                [
                  `  #${attempt.attempt} at ${shortTime(attempt.at)}: ${attempt.error.name}: ${attempt.error.message}`,
                  ...(attempt.error.stack === undefined ? [] : [indent(stackFrames(attempt.error.stack), '      ')]),
                ].join('\n'),
              );
              return [...head, ...attempts].join('\n');
            })
            .join('\n\n'),
        );
      });
    });

  addSelection(deadLetters.command('redrive').description('hand dead letters back to their subscriptions, in per-key order, keeping their ids'))
    .argument('[ids...]', 'dead-letter ids or message ids')
    .option('--rate <messages-per-second>', 'redrive at most this many messages per second', positiveNumber)
    .option('--actor <name>', 'who does this, for the audit table (default: OS user@host)')
    .option('--dry-run', 'show what would be redriven, change nothing')
    .action(async (ids: string[], options: SelectionOptions & { rate?: number; actor?: string; dryRun?: boolean }, command: Command) => {
      await withDeadLetters(context, command, async (store, globals) => {
        const selection = selectionOf(ids, options, 'redrive');
        if (options.dryRun === true) return dryRun(context, store, globals, selection, 'redrive');
        const bar = progress({ label: 'Redriving', enabled: showProgress(context, globals) });
        let result: DeadLetterActionResult;
        try {
          result = await store.redrive({
            ...selection,
            actor: options.actor,
            ratePerSecond: options.rate,
            signal: context.interrupt,
            onProgress: ({ done, total }) => total > 0 && bar.update(done, total),
          });
        } finally {
          bar.stop();
        }
        reportAction(context, globals, result, 'redrive', 'Redrove', 'Running workers retry them now, in per-key order; stopped ones when they start.');
      });
    });

  addSelection(deadLetters.command('drop').description('delete dead letters for good (recorded in the audit table)'))
    .argument('[ids...]', 'dead-letter ids or message ids')
    .option('--actor <name>', 'who does this, for the audit table (default: OS user@host)')
    .option('--dry-run', 'show what would be dropped, change nothing')
    .action(async (ids: string[], options: SelectionOptions & { actor?: string; dryRun?: boolean }, command: Command) => {
      await withDeadLetters(context, command, async (store, globals) => {
        const selection = selectionOf(ids, options, 'drop');
        if (options.dryRun === true) return dryRun(context, store, globals, selection, 'drop');
        const bar = progress({ label: 'Dropping', enabled: showProgress(context, globals) });
        let result: DeadLetterActionResult;
        try {
          result = await store.drop({
            ...selection,
            actor: options.actor,
            signal: context.interrupt,
            onProgress: ({ done, total }) => total > 0 && bar.update(done, total),
          });
        } finally {
          bar.stop();
        }
        reportAction(context, globals, result, 'drop', 'Dropped', 'Recorded in the dead_letter_actions table.');
      });
    });

  program
    .command('subscriptions')
    .description('subscriptions gone for good')
    .command('drop')
    .description('remove a subscription with no live worker: its cursors, held messages and inbox (its dead letters stay)')
    .argument('<subscription>', 'the subscription to remove')
    .action(async (subscription: string, _options: unknown, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const result = await dropSubscription(db.driver, { schema: globals.schema, subscription });
        emit(context, globals, result, () => `Dropped ${subscription} (${result.held} held message${result.held === 1 ? '' : 's'}, ${result.inbox} inbox record${result.inbox === 1 ? '' : 's'}); its dead letters stay.`);
      });
    });

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
                ? [`Note: ${result.skipped} message${result.skipped === 1 ? '' : 's'} before position ${result.fromPosition} had not been handled yet and are skipped.`]
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
        const url = globals.url ?? context.env.DATABASE_URL!;
        const report = await requestDriftCheck({ url, schema: globals.schema, replica: name, db: db.driver, timeoutMs: options.timeout * 1_000, signal: context.interrupt });
        emit(context, globals, report, () => renderDrift(report));
      });
    });

  const replicaCommands = program.command('replica').description('replicas of other services\' data: rebuild one from its source (tidings drift for status and checks)');
  replicaCommands
    .command('rebuild')
    .description("ask a replica to refill itself by state transfer from its source, over the bus, and follow its progress; readers see the previous table, whole, until the switch")
    .argument('<replica>', 'the replica, for example credentials-gw1 (tidings drift status lists them)')
    .option('--timeout <seconds>', 'give up when the replica reports no progress for this long', positiveNumber, 60)
    .action(async (name: string, options: { timeout: number }, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const url = globals.url ?? context.env.DATABASE_URL!;
        const bar = progress({ label: `Rebuilding ${name}`, enabled: showProgress(context, globals) });
        let report: RebuildReport;
        try {
          report = await requestRebuild({
            url,
            schema: globals.schema,
            replica: name,
            db: db.driver,
            timeoutMs: options.timeout * 1_000,
            signal: context.interrupt,
            onProgress: ({ done, total }) => total !== null && bar.update(done, Math.max(total, done)),
          });
        } finally {
          bar.stop();
        }
        emit(context, globals, report, () => renderRebuild(report));
      });
    });

  return program;
}

// ---- options -------------------------------------------------------------------------------------

interface SelectionOptions {
  subscription?: string;
  topic?: string;
  error?: string;
  all?: boolean;
}

interface TailCommandOptions {
  key?: string;
  type?: string;
  tenant?: string;
  grep?: string;
  from?: From;
  limit?: number;
}

type From = { kind: 'position'; position: number } | { kind: 'time'; time: string };

function addSelection(command: Command): Command {
  return addBrokerOptions(command)
    .option('--subscription <name>', 'only dead letters of this subscription')
    .option('--topic <topic>', 'only dead letters of this topic')
    .option('--error <text>', 'only dead letters whose reason or error message contains this text (any case)')
    .option('--all', 'every dead letter (required to redrive or drop without any other selection)');
}

/** Where a broker keeps Tidings' dead letters, when --url is amqp:// or nats://. */
function addBrokerOptions(command: Command): Command {
  return command
    .option('--prefix <prefix>', "with an amqp:// URL: the prefix of Tidings' exchanges and queues, as given to rabbitmq({ prefix })")
    .option('--stream <name>', "with a nats:// URL: the JetStream stream of Tidings' messages, as given to nats({ stream })");
}

function selectionOf(ids: readonly string[], options: SelectionOptions, action?: 'redrive' | 'drop'): DeadLetterSelection {
  const selection = { ids, subscription: options.subscription, topic: options.topic, errorText: options.error, all: options.all === true };
  const named = ids.length > 0 || options.subscription !== undefined || options.topic !== undefined || options.error !== undefined;
  if (action !== undefined && !named && !selection.all) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `Say which dead letters to ${action}: give their ids, or --subscription, --topic or --error, or --all for every one. See them first with: tidings dead-letters list --group`,
    );
  }
  return selection;
}

function parseSchema(value: string): string {
  try {
    return checkIdentifier('--schema', value);
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
}

function parseFrom(value: string): From {
  if (/^\d+$/.test(value)) {
    const position = Number(value);
    if (Number.isSafeInteger(position) && position >= 1) return { kind: 'position', position };
  } else if (/^\d{4}-\d{2}-\d{2}/.test(value) && !Number.isNaN(Date.parse(value))) {
    return { kind: 'time', time: new Date(value).toISOString() };
  }
  throw new InvalidArgumentError('expected a log position (a whole number from 1) or an ISO 8601 time such as 2026-01-31T12:00:00Z');
}

function positiveInteger(value: string): number {
  const number = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < 1) throw new InvalidArgumentError('expected a whole number from 1');
  return number;
}

function positiveNumber(value: string): number {
  const number = Number(value);
  if (value.trim() === '' || !Number.isFinite(number) || number <= 0) throw new InvalidArgumentError('expected a number above 0');
  return number;
}

// ---- running -------------------------------------------------------------------------------------

/**
 * Opens the database for one command and closes it after. A failure to reach it becomes a
 * BACKBONE_UNAVAILABLE error that names the URL tried, without its password.
 */
async function withDatabase(context: CliContext, command: Command, run: (db: Database, globals: GlobalOptions) => Promise<void>): Promise<void> {
  const globals = command.optsWithGlobals<GlobalOptions>();
  const url = globals.url ?? context.env.DATABASE_URL;
  if (url === undefined || url === '') {
    throw new TidingsError('INVALID_OPTIONS', 'No database given: pass --url postgres://user@host:5432/db, or set DATABASE_URL');
  }
  if (!/^postgres(ql)?:\/\//.test(url)) {
    throw new TidingsError('INVALID_OPTIONS', 'The database URL must start with postgres:// or postgresql://, for example postgres://user@host:5432/db');
  }
  const db = await openDatabase({ url, connectTimeoutMs: globals.connectTimeout * 1_000 });
  const started = Date.now();
  try {
    // One round trip first: an unreachable server costs one connect timeout, not one per pooled query.
    await db.driver.query('select 1');
    await run(db, globals);
  } catch (error) {
    if (isUnreachable(error)) {
      const gaveUp = Date.now() - started >= globals.connectTimeout * 1_000 ? globals.connectTimeout : undefined;
      throw new TidingsError('BACKBONE_UNAVAILABLE', unreachableMessage(error, { description: db.description, gaveUpAfterSeconds: gaveUp }), {
        cause: error,
        retryable: true,
      });
    }
    throw error;
  } finally {
    await db.close().catch(() => undefined);
  }
}

/** Dead letters wherever the URL points: a PostgreSQL schema, or a broker's dead-letter queues or stream. */
async function withDeadLetters(
  context: CliContext,
  command: Command,
  run: (store: DeadLetterStore, globals: GlobalOptions, where: string) => Promise<void>,
): Promise<void> {
  const globals = command.optsWithGlobals<GlobalOptions & BrokerOptions>();
  const url = globals.url ?? context.env.DATABASE_URL ?? '';
  const broker = await brokerFor(url, globals);
  if (broker === undefined) {
    await withDatabase(context, command, (db) => run(deadLetterStore(async () => db.driver, globals.schema), globals, `schema ${globals.schema}`));
    return;
  }
  try {
    await run(broker.backbone.deadLetters(), globals, broker.where);
  } finally {
    await broker.backbone.close().catch(() => undefined);
  }
}

interface BrokerOptions {
  prefix?: string;
  stream?: string;
}

/** A broker backbone for an amqp:// or nats:// URL, opened only to reach its dead letters (no relay, no consumers). */
async function brokerFor(url: string, options: GlobalOptions & BrokerOptions): Promise<{ backbone: Backbone; where: string } | undefined> {
  const quiet = () => undefined;
  const safeUrl = url.replace(/\/\/([^:@/]*):[^@/]*@/, '//$1@');
  if (/^amqps?:\/\//.test(url)) {
    const { rabbitmq, rabbitmqDefaults } = await import('../rabbitmq/index.ts');
    const prefix = options.prefix ?? rabbitmqDefaults.prefix;
    const backbone = rabbitmq({ url, prefix, relay: false, connectTimeoutMs: options.connectTimeout * 1_000, onWarning: quiet });
    return { backbone, where: `RabbitMQ at ${safeUrl} (prefix ${prefix})` };
  }
  if (/^nats:\/\//.test(url)) {
    const { nats, natsDefaults } = await import('../nats/index.ts');
    const stream = options.stream ?? natsDefaults.stream;
    const backbone = nats({ servers: url, stream, relay: false, publishTimeoutMs: options.connectTimeout * 1_000, onWarning: quiet });
    return { backbone, where: `NATS at ${safeUrl} (stream ${stream})` };
  }
  return undefined;
}

/** Stores that cannot group by themselves are grouped here, from as many dead letters as a list returns. */
async function groupOf(store: DeadLetterStore, selection: DeadLetterSelection & { limit?: number }): Promise<DeadLetterGroup[]> {
  if (store.group !== undefined) return store.group(selection);
  const { deadLetters } = await store.list({ ...selection, limit: adminDefaults.groupScanLimit });
  return groupDeadLetters(deadLetters, selection.limit);
}

function emit(context: CliContext, globals: GlobalOptions, value: unknown, human: () => string): void {
  if (globals.json) context.out(`${JSON.stringify(value, null, 2)}\n`);
  else {
    const text = human();
    if (text !== '') context.out(`${text}\n`);
  }
}

function showProgress(context: CliContext, globals: GlobalOptions): boolean {
  return context.stdoutIsTTY && !globals.json;
}

async function positionOf(db: Database, schema: string, from: From, topics: string[]): Promise<number> {
  if (from.kind === 'position') return from.position;
  return firstPositionAt(db.driver, { schema, time: from.time, topics });
}

async function dryRun(context: CliContext, store: DeadLetterStore, globals: GlobalOptions, selection: DeadLetterSelection, action: string): Promise<void> {
  const matched = await store.count(selection);
  const groups = matched === 0 ? [] : await groupOf(store, selection);
  emit(context, globals, { dryRun: true, action, matched, groups }, () =>
    matched === 0 ? `Nothing to ${action}: no dead letter matches.` : `Would ${action} ${matched} dead letter${matched === 1 ? '' : 's'}:\n${renderGroups(groups)}`,
  );
}

function reportAction(context: CliContext, globals: GlobalOptions, result: DeadLetterActionResult, action: 'redrive' | 'drop', done: string, then: string): void {
  emit(context, globals, result, () => {
    if (result.matched === 0) return `Nothing to ${action}: no dead letter matches.`;
    const by = Object.entries(result.bySubscription)
      .map(([subscription, count]) => `${subscription}: ${count}`)
      .join(', ');
    return `${done} ${result.count} dead letter${result.count === 1 ? '' : 's'} (${by}). ${then}`;
  });
  if (result.stopped) {
    throw new CommandFailed(`Stopped after ${result.count} of ${result.matched}; the others are still dead letters. Run the same command again to continue.`);
  }
}

async function waitForCatchUp(context: CliContext, db: Database, globals: GlobalOptions, subscription: string, total: number): Promise<boolean> {
  const first = await readStatus(db.driver, { schema: globals.schema, subscription });
  if (!globals.json && !first.subscriptions[0]?.workers.some((worker) => worker.live)) {
    context.err(`No live worker runs ${subscription} now: the replay happens when one starts. Ctrl-C stops waiting.\n`);
  }
  const bar = progress({ label: 'Replaying', enabled: showProgress(context, globals) });
  try {
    for (;;) {
      const status = await readStatus(db.driver, { schema: globals.schema, subscription });
      const lag = status.subscriptions[0]?.lag ?? 0;
      bar.update(Math.max(0, total - lag), Math.max(total, lag));
      if (lag === 0) return true;
      if (context.interrupt.aborted) return false;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 500);
        context.interrupt.addEventListener('abort', () => {
          clearTimeout(timer);
          resolve();
        }, { once: true });
      });
    }
  } finally {
    bar.stop();
  }
}

// ---- rendering -----------------------------------------------------------------------------------

function renderReplicas(replicas: readonly ReplicaStatus[]): string {
  return [
    'Replicas',
    table(replicas, [
      { header: 'replica', value: (r) => r.name },
      { header: 'source', value: (r) => r.source },
      { header: 'rows', value: (r) => r.rows },
      { header: 'generation', value: (r) => (r.building === null ? r.generation : `${r.generation} (building ${r.building})`) },
      { header: 'last check', value: (r) => (r.checkedAt === null ? 'never' : shortTime(r.checkedAt)) },
      { header: 'missing', value: (r) => r.lastCheck?.missing ?? '' },
      { header: 'extra', value: (r) => r.lastCheck?.extra ?? '' },
      { header: 'different', value: (r) => r.lastCheck?.different ?? '' },
      { header: 'repaired', value: (r) => r.lastCheck?.repaired ?? '' },
    ]),
  ].join('\n');
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
    if (report.samples[kind].length > 0) lines.push(`  ${kind}: ${report.samples[kind].join(', ')}${report[kind] > report.samples[kind].length ? ', ...' : ''}`);
  }
  return lines.join('\n');
}

function renderStatus(status: Status, where: string): string {
  const lines = [`Schema ${status.schema} at ${where}, ${shortTime(status.at)}`, ''];
  if (status.subscriptions.length === 0) {
    lines.push('No subscriptions yet: they appear when a bus with subscribers starts.');
    return lines.join('\n');
  }
  lines.push(
    table(status.subscriptions, [
      { header: 'subscription', value: (sub) => sub.name },
      { header: 'topics', value: (sub) => sub.topics.join(', '), max: 40 },
      { header: 'workers', value: (sub) => sub.workers.filter((worker) => worker.live).length },
      { header: 'lag', value: (sub) => sub.lag },
      { header: 'oldest unprocessed', value: (sub) => duration(sub.oldestUnprocessedAgeMs), align: 'right' },
      { header: 'handled', value: (sub) => sub.handled },
      { header: 'held keys', value: (sub) => sub.heldKeys },
      { header: 'dead letters', value: (sub) => sub.deadLetters },
    ]),
  );
  for (const sub of status.subscriptions) {
    for (const { worker, missing } of sub.disagreements) {
      lines.push('', `! ${sub.name}: worker ${worker} has no handler for ${missing.join(', ')}; it holds no partition until it has one or the subscription's topics change (a rolling deploy, until the old version's workers stop)`);
    }
  }
  for (const sub of status.subscriptions) {
    lines.push('', `${sub.name}: ${sub.partitions} partition${sub.partitions === 1 ? '' : 's'}${sub.heldMessages > 0 ? `, ${sub.heldMessages} held message${sub.heldMessages === 1 ? '' : 's'} on ${sub.heldKeys} key${sub.heldKeys === 1 ? '' : 's'}` : ''}`);
    lines.push(
      table(
        sub.cursors,
        [
          { header: 'partition', value: (cursor) => cursor.partition },
          { header: 'owner', value: (cursor) => cursor.owner },
          { header: 'lease', value: (cursor) => lease(cursor.owner, cursor.leaseRemainingMs) },
          { header: 'epoch', value: (cursor) => cursor.epoch, align: 'right' },
          { header: 'handled', value: (cursor) => cursor.handled },
          { header: 'lag', value: (cursor) => cursor.lag },
          { header: 'oldest unprocessed', value: (cursor) => duration(cursor.oldestUnprocessedAgeMs), align: 'right' },
        ],
        '  ',
      ),
    );
  }
  lines.push('', 'Workers:');
  lines.push(
    status.workers.length === 0
      ? '  none registered'
      : table(
          status.workers,
          [
            { header: 'id', value: (worker) => worker.id },
            { header: 'subscription', value: (worker) => worker.subscription },
            { header: 'host', value: (worker) => worker.host },
            { header: 'pid', value: (worker) => worker.pid },
            { header: 'started', value: (worker) => shortTime(worker.startedAt) },
            { header: 'state', value: (worker) => (worker.live ? 'live' : 'expired') },
            { header: 'topics', value: (worker) => worker.topics?.join(', ') ?? '?', max: 40 },
          ],
          '  ',
        ),
  );
  return lines.join('\n');
}

function renderGroups(groups: readonly DeadLetterGroup[]): string {
  return table(groups, [
    { header: 'count', value: (group) => group.count },
    { header: 'subscription', value: (group) => group.subscription },
    { header: 'topics', value: (group) => group.topics.join(', '), max: 30 },
    { header: 'last', value: (group) => shortTime(group.lastAt) },
    { header: 'error', value: (group) => group.pattern, max: 100 },
  ]);
}

/** `2026-01-31 12:00:05Z`: an ISO time without the milliseconds, readable in a table. */
function shortTime(value: string): string {
  const time = new Date(value);
  return Number.isNaN(time.getTime()) ? value : time.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

function indent(text: string, prefix: string): string {
  return text
    .split('\n')
    .map((line) => prefix + line)
    .join('\n');
}

/** A stack without its first line, which repeats the message shown just above it. */
function stackFrames(stack: string): string {
  const lines = stack.split('\n');
  const first = lines.findIndex((line) => /^\s+at /.test(line));
  return (first === -1 ? lines : lines.slice(first)).map((line) => line.trim()).join('\n');
}
