/** `tidings dead-letters list|show|redrive|drop`: on PostgreSQL, RabbitMQ or NATS. */
import type { Command } from 'commander';
import {
  groupDeadLetters,
  TidingsError,
  type Backbone,
  type DeadLetterActionResult,
  type DeadLetterGroup,
  type DeadLetterSelection,
  type DeadLetterStore,
  type DeadLetterSummary,
} from 'tidings';
import { adminDefaults, deadLetterStore } from 'tidings/postgres';
import { positiveInteger, positiveNumber } from '../arguments.ts';
import type { GlobalOptions } from '../config.ts';
import { CommandFailed, emit, globalsOf, settingsOf, showProgress, type CliContext } from '../context.ts';
import { withDatabaseAt } from '../database.ts';
import { shortTime, table, withProgress, type Column } from '../format.ts';
import { acrossStamps, emitStamps, readStamps, type StampReading } from '../stamps.ts';

export function registerDeadLetters(program: Command, context: CliContext): void {
  const deadLetters = program.command('dead-letters').description('messages a subscription gave up on: list, show, redrive, drop');

  addSelection(deadLetters.command('list').description('list dead letters, oldest first, or --group them by error'))
    .option('--limit <count>', 'show at most this many rows', positiveInteger, 50)
    .option('--group', 'one row per subscription and error (numbers and ids masked), largest first')
    .action(async (options: SelectionOptions & { limit: number; group?: boolean }, command: Command) => {
      const settings = settingsOf(context, command);
      if (acrossStamps(settings)) return listEveryStamp(context, settings, options);
      await withDeadLetters(context, command, async (store, globals) => {
        const selection = selectionOf([], options);
        if (options.group === true) {
          const groups = await groupOf(store, { ...selection, limit: options.limit });
          emit(context, globals, groups, () => (groups.length === 0 ? 'No dead letters.' : renderGroups(groups, context.columns)));
          return;
        }
        const { total, deadLetters: rows } = await store.list({ ...selection, limit: options.limit });
        emit(context, globals, { total, deadLetters: rows }, () => {
          if (total === 0) return 'No dead letters.';
          const shown = table(rows, deadLetterColumns(), { width: context.columns });
          const more = total > rows.length ? `\n${rows.length} of ${total} shown: narrow the selection or raise --limit.` : '';
          return `${shown}${more}\nShow one with: tidings dead-letters show <id>`;
        });
      });
    });

  addSelection(deadLetters.command('count').description('how many dead letters match; with stamps configured, per tenant')).action(
    async (options: SelectionOptions, command: Command) => {
      const settings = settingsOf(context, command);
      // Counting changes nothing: without a selection it counts every dead letter, as list shows them.
      const count = (globals: GlobalOptions) => withDeadLettersAt(globals, (store) => store.count({ ...selectionOf([], options), all: true }));
      if (!acrossStamps(settings)) {
        const counted = await count(globalsOf(context, command));
        emit(context, settings, { count: counted }, () => `${counted}`);
        return;
      }
      const readings = await readStamps(settings, count);
      emitStamps(context, settings, readings, () =>
        table(
          readings,
          [
            { header: 'tenant', value: (reading) => reading.tenant },
            { header: 'dead letters', value: (reading) => ('error' in reading ? '-' : reading.value), align: 'right' },
            { header: 'where', value: (reading) => reading.where },
            { header: 'error', value: (reading) => ('error' in reading ? reading.error.message : ''), max: 100, shrink: 1 },
          ],
          { width: context.columns },
        ),
      );
    },
  );

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
              // A failure repeated on every attempt is thrown from the same place each time: its stack is shown
              // once, then referred to. (Only the top frames are compared: the async frames below them vary.)
              const firstFrom = new Map<string, number>();
              const attempts = letter.attempts.map((attempt) => {
                const frames = attempt.error.stack === undefined ? undefined : stackFrames(attempt.error.stack);
                const place = frames?.split('\n').slice(0, 3).join('\n');
                const same = place === undefined ? undefined : firstFrom.get(place);
                if (place !== undefined && same === undefined) firstFrom.set(place, attempt.attempt);
                return [
                  `  #${attempt.attempt} at ${shortTime(attempt.at)}: ${attempt.error.name}: ${attempt.error.message}`,
                  ...(frames === undefined
                    ? []
                    : [same === undefined ? indent(frames, '      ') : `      (thrown from the same place as #${same}: stack above)`]),
                ].join('\n');
              });
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
        const result = await withProgress({ label: 'Redriving', enabled: showProgress(context, globals) }, (bar) =>
          store.redrive({
            ...selection,
            actor: options.actor,
            ratePerSecond: options.rate,
            signal: context.interrupt,
            onProgress: ({ done, total }) => total > 0 && bar.update(done, total),
          }),
        );
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
        const result = await withProgress({ label: 'Dropping', enabled: showProgress(context, globals) }, (bar) =>
          store.drop({ ...selection, actor: options.actor, signal: context.interrupt, onProgress: ({ done, total }) => total > 0 && bar.update(done, total) }),
        );
        reportAction(context, globals, result, 'drop', 'Dropped', 'Recorded in the dead_letter_actions table.');
      });
    });
}

interface SelectionOptions {
  subscription?: string;
  topic?: string;
  error?: string;
  all?: boolean;
}

/** The columns of a dead letters' table (`list`, on one stamp or every stamp). */
function deadLetterColumns<R extends DeadLetterSummary>(): Column<R>[] {
  return [
    { header: 'id', value: (row) => row.id, align: 'right' },
    { header: 'subscription', value: (row) => row.subscription },
    { header: 'topic', value: (row) => row.topic },
    { header: 'key', value: (row) => row.key, max: 24, shrink: 1 },
    { header: 'attempts', value: (row) => row.attempts },
    { header: 'dead at', value: (row) => shortTime(row.deadAt) },
    { header: 'reason', value: (row) => row.reason, max: 80, shrink: 2 },
  ];
}

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

/** Dead letters wherever the URL points: a PostgreSQL schema, or a broker's dead-letter queues or stream. */
async function withDeadLetters(
  context: CliContext,
  command: Command,
  run: (store: DeadLetterStore, globals: GlobalOptions, where: string) => Promise<void>,
): Promise<void> {
  await withDeadLettersAt(globalsOf(context, command), run);
}

/** withDeadLetters at the place `globals` name: one stamp of several. */
async function withDeadLettersAt<T>(globals: GlobalOptions, run: (store: DeadLetterStore, globals: GlobalOptions, where: string) => Promise<T>): Promise<T> {
  const url = globals.url ?? '';
  const broker = await brokerFor(url, globals);
  if (broker === undefined) {
    return withDatabaseAt(globals, (db) =>
      run(
        deadLetterStore(async () => db.driver, globals.schema),
        globals,
        `schema ${globals.schema}`,
      ),
    );
  }
  try {
    return await run(broker.backbone.deadLetters(), globals, broker.where);
  } finally {
    await broker.backbone.close().catch(() => undefined);
  }
}

/**
 * `tidings dead-letters list` on every stamp: JSON keyed by tenant (each `{total, deadLetters}`, or the groups
 * with --group); for a person, one table with a tenant column, then each tenant's total and any stamp not read.
 */
async function listEveryStamp(context: CliContext, settings: GlobalOptions, options: SelectionOptions & { limit: number; group?: boolean }): Promise<void> {
  const selection = selectionOf([], options);
  const tenantColumn = { header: 'tenant', value: (row: { tenant: string }) => row.tenant };
  const failures = (readings: readonly StampReading<unknown>[]) =>
    readings.flatMap((reading) => ('error' in reading ? [`tenant ${reading.tenant}: cannot read: ${reading.error.message}`] : []));
  if (options.group === true) {
    const readings = await readStamps(settings, (globals) => withDeadLettersAt(globals, (store) => groupOf(store, { ...selection, limit: options.limit })));
    emitStamps(context, settings, readings, () => {
      const rows = readings.flatMap((reading) => ('error' in reading ? [] : reading.value.map((group) => ({ ...group, tenant: reading.tenant }))));
      return [rows.length === 0 ? 'No dead letters.' : renderGroups(rows, context.columns, tenantColumn), ...failures(readings)].join('\n');
    });
    return;
  }
  const readings = await readStamps(settings, (globals) => withDeadLettersAt(globals, (store) => store.list({ ...selection, limit: options.limit })));
  emitStamps(context, settings, readings, () => {
    const rows = readings.flatMap((reading) => ('error' in reading ? [] : reading.value.deadLetters.map((row) => ({ ...row, tenant: reading.tenant }))));
    const shown =
      rows.length === 0 ? 'No dead letters.' : table(rows, [tenantColumn, ...deadLetterColumns<(typeof rows)[number]>()], { width: context.columns });
    const totals = readings.flatMap((reading) =>
      'error' in reading
        ? []
        : [
            `tenant ${reading.tenant}: ${reading.value.total} dead letter${reading.value.total === 1 ? '' : 's'}${reading.value.total > reading.value.deadLetters.length ? ` (${reading.value.deadLetters.length} shown)` : ''}`,
          ],
    );
    return [shown, ...totals, ...failures(readings), 'Show one with: tidings --stamp <tenant> dead-letters show <id>'].join('\n');
  });
}

/** A broker backbone for an amqp:// or nats:// URL, opened only to reach its dead letters (no relay, no consumers). */
async function brokerFor(url: string, options: GlobalOptions): Promise<{ backbone: Backbone; where: string } | undefined> {
  const quiet = () => undefined;
  const safeUrl = url.replace(/\/\/([^:@/]*):[^@/]*@/, '//$1@');
  if (/^amqps?:\/\//.test(url)) {
    const { rabbitmq, rabbitmqDefaults } = await import('tidings/rabbitmq');
    const prefix = options.prefix ?? rabbitmqDefaults.prefix;
    const backbone = rabbitmq({ url, prefix, relay: false, connectTimeoutMs: options.connectTimeout * 1_000, onWarning: quiet });
    return { backbone, where: `RabbitMQ at ${safeUrl} (prefix ${prefix})` };
  }
  if (/^nats:\/\//.test(url)) {
    const { nats, natsDefaults } = await import('tidings/nats');
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

async function dryRun(context: CliContext, store: DeadLetterStore, globals: GlobalOptions, selection: DeadLetterSelection, action: string): Promise<void> {
  const matched = await store.count(selection);
  const groups = matched === 0 ? [] : await groupOf(store, selection);
  emit(context, globals, { dryRun: true, action, matched, groups }, () =>
    matched === 0
      ? `Nothing to ${action}: no dead letter matches.`
      : `Would ${action} ${matched} dead letter${matched === 1 ? '' : 's'}:\n${renderGroups(groups, context.columns)}`,
  );
}

function reportAction(
  context: CliContext,
  globals: GlobalOptions,
  result: DeadLetterActionResult,
  action: 'redrive' | 'drop',
  done: string,
  then: string,
): void {
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

function renderGroups<G extends DeadLetterGroup>(
  groups: readonly G[],
  width: number | undefined,
  ...first: { header: string; value: (group: G) => string }[]
): string {
  return table(
    groups,
    [
      ...first,
      { header: 'count', value: (group) => group.count },
      { header: 'subscription', value: (group) => group.subscription },
      { header: 'topics', value: (group) => group.topics.join(', '), max: 30, shrink: 1 },
      { header: 'last', value: (group) => shortTime(group.lastAt) },
      { header: 'error', value: (group) => group.pattern, max: 100, shrink: 2 },
    ],
    { width },
  );
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
