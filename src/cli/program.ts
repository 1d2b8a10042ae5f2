/**
 * The `tidings` program: its global options and help, and the list of its commands. Each command is a file
 * of commands/ that adds itself (a Register): it opens the database (database.ts), calls one function of
 * tidings/postgres (or tidings/replica, tidings/asyncapi), and shows the result (context.ts, format.ts).
 * Only this file knows every command; the commands know none of each other.
 */
import { readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import { parseSchema, positiveNumber } from './arguments.ts';
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
import { CONFIG_FILE, cliDefaults } from './config.ts';
import type { CliContext, Register } from './context.ts';

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
                   also connectTimeout, prefix, stream, and "stamps" for a backbone per tenant:
                   {"stamps": {"acme": {"schema": "tidings_acme"}, "globex": {"url": "postgres://.../globex"}}}
                   status, dead-letters list|count and tenants list then read every stamp (or --stamp <tenant> one);
                   every other command needs --stamp <tenant>

Examples:
  tidings status
  tidings status --stamp acme
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
    .addOption(
      new Option(
        '--stamp <tenant>',
        `with "stamps" in ${CONFIG_FILE} (a backbone per tenant): work on this tenant's stamp only; required by commands that change things`,
      ),
    )
    .addHelpText('after', HELP_AFTER);

  for (const register of commands) register(program, context);
  return program;
}

/** This package's version, from its package.json (two folders up from src/cli and from dist/cli alike). */
function packageVersion(): string {
  return (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
}
