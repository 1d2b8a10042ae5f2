/**
 * The `tidings` program: its global options, and what every command shares (opening the database, the
 * parsers of option values, printing a table or JSON). Each command is a file of commands/, which opens the
 * database, calls one function of tidings/postgres (or tidings/replica), and shows the result: an aligned
 * table for a person, or JSON with `--json` for a script. Failures become exit codes in main.ts; nothing here
 * exits the process.
 */
import { readFileSync } from 'node:fs';
import { Command, InvalidArgumentError, Option } from 'commander';
import { TidingsError } from '../index.ts';
import { firstPositionAt } from '../postgres/index.ts';
import { checkIdentifier } from '../postgres/connection/identifiers.ts';
import { urlProblem } from '../postgres/connection/url.ts';
import { registerAsyncApi } from './commands/asyncapi.ts';
import { registerContracts } from './commands/contracts.ts';
import { registerDeadLetters } from './commands/dead-letters.ts';
import { registerMigrate } from './commands/migrate.ts';
import { registerPrune } from './commands/prune.ts';
import { registerReplay } from './commands/replay.ts';
import { registerReplicas } from './commands/replicas.ts';
import { registerSagas } from './commands/sagas.ts';
import { registerStatus } from './commands/status.ts';
import { registerSubscriptions } from './commands/subscriptions.ts';
import { registerTail } from './commands/tail.ts';
import { registerTenants } from './commands/tenants.ts';
import { CONFIG_FILE, cliDefaults, resolveGlobals, type GivenOptions, type GlobalOptions } from './config.ts';
import { isUnreachable, openDatabase, unreachableMessage, type Database } from './database.ts';

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
  /** Where the config file is looked for (see config.ts); the process's folder when absent. */
  readonly cwd?: string;
  /** Aborted by Ctrl-C: long operations stop between steps and say how far they got. */
  readonly interrupt: AbortSignal;
  readonly stdoutIsTTY: boolean;
  /** The terminal's width, when stdout is one: tables are cut to fit. */
  readonly columns?: number | undefined;
  readonly out: (text: string) => void;
  readonly err: (text: string) => void;
}

const HELP_AFTER = `
Exit codes:
  0  success
  1  the operation failed (an error from the database, nothing found, stopped half-way)
  2  usage error (unknown command or option, a bad value, no dead letters named)
  3  the database is unreachable (not running, wrong host or port, login refused, no such database)

Environment and config file (the command line wins, then the environment, then the file):
  DATABASE_URL     the database when --url is not given
  TIDINGS_SCHEMA   the schema when --schema is not given
  NO_COLOR         no colours, even on a terminal
  ${CONFIG_FILE}  in this folder or the nearest one above (or --config <file>): {"schema": "shop", "url": "postgres://..."};
                   also connectTimeout, prefix, stream

Examples:
  tidings status
  tidings tail orders.order-placed --key o-42
  tidings dead-letters list --group
  tidings dead-letters redrive --subscription billing --error "gateway timeout" --rate 50
  tidings dead-letters list --url amqp://guest:guest@localhost:5672 --prefix shop.
  tidings replay billing --from 2026-01-31T12:00:00Z --wait
  tidings prune --dry-run
  tidings drift check credentials-gw1
  tidings replica rebuild credentials-gw1
  tidings asyncapi --system --check asyncapi.json
  tidings contracts check --module src/contracts.ts --against asyncapi.json
  tidings tenants suspend acme --reason unpaid`;

/** Each command's file adds it to the program. */
export type Register = (program: Command, context: CliContext) => void;

const commands: readonly Register[] = [
  registerMigrate,
  registerStatus,
  registerTail,
  registerDeadLetters,
  registerSubscriptions,
  registerReplay,
  registerPrune,
  registerReplicas,
  registerSagas,
  registerAsyncApi,
  registerContracts,
  registerTenants,
];

export function buildProgram(context: CliContext): Command {
  const program = new Command('tidings')
    .description('Operate Tidings: schema, status and lag, live tail, dead letters (on PostgreSQL, RabbitMQ or NATS), replay, retention, replicas.')
    .version(packageVersion(), '-V, --version', "print Tidings' version")
    .exitOverride()
    .configureOutput({ writeOut: context.out, writeErr: context.err })
    .showHelpAfterError('(add --help for usage)')
    .configureHelp({ showGlobalOptions: true })
    .addOption(
      new Option(
        '--url <url>',
        "PostgreSQL connection URL (default: $DATABASE_URL, or the config file's url); the dead-letters commands also take amqp:// and nats:// URLs",
      ),
    )
    .addOption(
      new Option('--schema <name>', `schema of Tidings' tables (default: $TIDINGS_SCHEMA, the config file's schema, or ${cliDefaults.schema})`).argParser(
        parseSchema,
      ),
    )
    .addOption(new Option('--json', 'print JSON for scripts instead of tables'))
    .addOption(
      new Option('--connect-timeout <seconds>', `give up connecting after this long (default: ${cliDefaults.connectTimeout})`).argParser(positiveNumber),
    )
    .addOption(new Option('--config <file>', `read settings from this file instead of the nearest ${CONFIG_FILE}`))
    .addHelpText('after', HELP_AFTER);

  for (const register of commands) register(program, context);
  return program;
}

/** This package's version, from its package.json (two folders up from src/cli and from dist/cli alike). */
function packageVersion(): string {
  return (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}

// ---- options -------------------------------------------------------------------------------------

export type From = { kind: 'position'; position: number } | { kind: 'time'; time: string };

function parseSchema(value: string): string {
  try {
    return checkIdentifier('--schema', value);
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
}

export function parseFrom(value: string): From {
  if (/^\d+$/.test(value)) {
    const position = Number(value);
    if (Number.isSafeInteger(position) && position >= 1) return { kind: 'position', position };
  } else if (/^\d{4}-\d{2}-\d{2}/.test(value) && !Number.isNaN(Date.parse(value))) {
    return { kind: 'time', time: new Date(value).toISOString() };
  }
  throw new InvalidArgumentError('expected a log position (a whole number from 1) or an ISO 8601 time such as 2026-01-31T12:00:00Z');
}

export function positiveInteger(value: string): number {
  const number = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < 1) throw new InvalidArgumentError('expected a whole number from 1');
  return number;
}

export function positiveNumber(value: string): number {
  const number = Number(value);
  if (value.trim() === '' || !Number.isFinite(number) || number <= 0) throw new InvalidArgumentError('expected a number above 0');
  return number;
}

// ---- running -------------------------------------------------------------------------------------

/** The global options of `command`, completed from the environment, the config file and the defaults (config.ts). */
export function globalsOf(context: CliContext, command: Command): GlobalOptions {
  return resolveGlobals(command.optsWithGlobals<GivenOptions>(), context.env, context.cwd ?? process.cwd());
}

/**
 * Opens the database for one command and closes it after. A failure to reach it becomes a
 * BACKBONE_UNAVAILABLE error that names the URL tried, without its password.
 */
export async function withDatabase(context: CliContext, command: Command, run: (db: Database, globals: GlobalOptions) => Promise<void>): Promise<void> {
  const globals = globalsOf(context, command);
  const url = globals.url;
  if (url === undefined) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `No database given: pass --url postgres://user@host:5432/db, or set DATABASE_URL, or give a url in ${CONFIG_FILE}`,
    );
  }
  const problem = urlProblem(url);
  if (problem !== undefined) throw new TidingsError('INVALID_OPTIONS', `The database ${problem.replace(/^url/, 'URL')}`);
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
        retryable: error instanceof TidingsError ? error.retryable : true,
      });
    }
    if (causedBy(error, MISSING_RELATION) && !(await hasTidingsTables(db, globals.schema).catch(() => true))) {
      throw new TidingsError('INVALID_OPTIONS', await wrongSchemaMessage(db, globals.schema), { cause: error });
    }
    throw error;
  } finally {
    await db.close().catch(() => undefined);
  }
}

/** SQLSTATEs of a table or schema that is not there: 42P01 undefined_table, 3F000 invalid_schema_name. */
const MISSING_RELATION = new Set(['42P01', '3F000']);

/** True when `error` or one of its causes has one of these SQLSTATEs. */
function causedBy(error: unknown, codes: ReadonlySet<string>): boolean {
  for (let current = error; current !== undefined && current !== null; current = (current as { cause?: unknown }).cause) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string' && codes.has(code)) return true;
    if (!(current instanceof Error)) break;
  }
  return false;
}

/** Schemas holding Tidings' tables: a log and a migrations table side by side. */
async function tidingsSchemas(db: Database): Promise<string[]> {
  const { rows } = await db.driver.query<{ schema: string }>(
    `select l.table_schema as schema from information_schema.tables l
       join information_schema.tables m on m.table_schema = l.table_schema and m.table_name = 'migrations'
      where l.table_name = 'log' order by 1`,
  );
  return rows.map((row) => row.schema);
}

async function hasTidingsTables(db: Database, schema: string): Promise<boolean> {
  return (await tidingsSchemas(db)).includes(schema);
}

/** A --schema with no Tidings tables: which schemas have them, and how to pick one. */
async function wrongSchemaMessage(db: Database, schema: string): Promise<string> {
  const found = await tidingsSchemas(db);
  return found.length === 0
    ? `Schema ${schema} at ${db.description} has no Tidings tables, and no other schema there has them: a bus creates its schema when it starts, or run tidings migrate --schema ${schema}`
    : `Schema ${schema} at ${db.description} has no Tidings tables; ${found.length === 1 ? 'this schema has' : 'these have'}: ${listed(found, 10)}. Choose with --schema, TIDINGS_SCHEMA or "schema" in ${CONFIG_FILE}`;
}

/** `a, b, c` or, past `max`, `a, b, c and 7 more`. */
export function listed(items: readonly string[], max: number): string {
  return items.length <= max ? items.join(', ') : `${items.slice(0, max).join(', ')} and ${items.length - max} more`;
}

export function emit(context: CliContext, globals: GlobalOptions, value: unknown, human: () => string): void {
  if (globals.json) context.out(`${JSON.stringify(value, null, 2)}\n`);
  else {
    const text = human();
    if (text !== '') context.out(`${text}\n`);
  }
}

export function showProgress(context: CliContext, globals: GlobalOptions): boolean {
  return context.stdoutIsTTY && !globals.json;
}

export async function positionOf(db: Database, schema: string, from: From, topics: string[]): Promise<number> {
  if (from.kind === 'position') return from.position;
  return firstPositionAt(db.driver, { schema, time: from.time, topics });
}
