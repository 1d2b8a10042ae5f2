/**
 * Where the CLI's global settings come from, first found wins: the command line (`--schema`), the
 * environment (`TIDINGS_SCHEMA`, `DATABASE_URL`), a `tidings.config.json` in the current folder or the
 * nearest folder above it (or `--config <file>`), then the defaults. So `--schema` need not be repeated.
 *
 * A config file may also hold `stamps`: one place per tenant (a schema, a database, a broker vhost or prefix),
 * for a deployment with a backbone per tenant (tidings/stamps). A stamp's own settings win; what it leaves out
 * comes from the usual places above. Read-only commands that make sense across tenants (status, dead-letters
 * list and count, tenants list) run on every stamp unless `--stamp <tenant>` names one; every other command needs `--stamp <tenant>`, so
 * nothing is replayed, redriven or pruned on every tenant by accident.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { TidingsError } from 'tidings';
import { checkIdentifier } from './internals.ts';

export const CONFIG_FILE = 'tidings.config.json';

export const cliDefaults = {
  schema: 'tidings',
  connectTimeout: 10,
} as const;

/** What one stamp of the config file may set: where its tenant's backbone is. */
interface StampConfig {
  url?: string;
  schema?: string;
  prefix?: string;
  stream?: string;
}

/** The settings a config file may hold: the global options' long names, and the stamps by tenant. */
interface ConfigFile extends StampConfig {
  connectTimeout?: number;
  stamps?: Record<string, StampConfig>;
}

const KEYS = ['url', 'schema', 'connectTimeout', 'prefix', 'stream', 'stamps'] as const satisfies readonly (keyof ConfigFile)[];
const STAMP_KEYS = ['url', 'schema', 'prefix', 'stream'] as const satisfies readonly (keyof StampConfig)[];
/** A tenant names a stamp on the command line and in ids such as `acme/42`: no spaces, no slash. */
const TENANT = /^[A-Za-z0-9_][A-Za-z0-9_.:-]*$/;

/** One tenant's place, its settings completed from the global ones. */
export interface Stamp {
  readonly tenant: string;
  readonly url: string | undefined;
  readonly schema: string;
  readonly prefix: string | undefined;
  readonly stream: string | undefined;
}

export interface GlobalOptions {
  /** The database (or broker) URL; undefined when none was given anywhere. */
  readonly url: string | undefined;
  readonly schema: string;
  readonly json: boolean;
  readonly connectTimeout: number;
  readonly prefix: string | undefined;
  readonly stream: string | undefined;
  /** The config file read, if one was. */
  readonly configFile: string | undefined;
  /** The config file's stamps, one per tenant, in the file's order; empty when it has none. */
  readonly stamps: readonly Stamp[];
  /** The stamp chosen with --stamp (its settings are then url, schema, prefix and stream above). */
  readonly tenant: string | undefined;
}

/** What commander parsed from the command line: undefined where an option was not given. */
export interface GivenOptions {
  url?: string;
  schema?: string;
  json?: boolean;
  connectTimeout?: number;
  prefix?: string;
  stream?: string;
  config?: string;
  /** --stamp: the tenant whose stamp to work on. */
  stamp?: string;
}

export function resolveGlobals(given: GivenOptions, env: NodeJS.ProcessEnv, cwd: string): GlobalOptions {
  const path = given.config !== undefined ? resolve(cwd, given.config) : findConfig(cwd);
  if (given.config !== undefined && !existsSync(path!)) throw new TidingsError('INVALID_OPTIONS', `--config ${given.config}: no such file`);
  const file = path === undefined ? {} : readConfig(path);
  const envSchema = env.TIDINGS_SCHEMA === '' ? undefined : env.TIDINGS_SCHEMA;
  if (envSchema !== undefined) checkIdentifier('TIDINGS_SCHEMA', envSchema);
  const envUrl = env.DATABASE_URL === '' ? undefined : env.DATABASE_URL;
  const top = {
    url: given.url ?? envUrl ?? file.url,
    schema: given.schema ?? envSchema ?? file.schema ?? cliDefaults.schema,
    prefix: given.prefix ?? file.prefix,
    stream: given.stream ?? file.stream,
  };
  const stamps = Object.entries(file.stamps ?? {}).map(
    ([tenant, stamp]): Stamp => ({
      tenant,
      url: stamp.url ?? top.url,
      schema: stamp.schema ?? top.schema,
      prefix: stamp.prefix ?? top.prefix,
      stream: stamp.stream ?? top.stream,
    }),
  );
  const globals: GlobalOptions = {
    ...top,
    json: given.json === true,
    connectTimeout: given.connectTimeout ?? file.connectTimeout ?? cliDefaults.connectTimeout,
    configFile: path,
    stamps,
    tenant: undefined,
  };
  return given.stamp === undefined ? globals : atStamp(globals, stampNamed(globals, given.stamp));
}

/**
 * The globals of a command that works on one place: with stamps configured, the one --stamp names;
 * without --stamp it is refused, naming the tenants, so that nothing changes on every tenant by accident.
 */
export function oneStamp(globals: GlobalOptions, commandName: string): GlobalOptions {
  if (globals.stamps.length === 0 || globals.tenant !== undefined) return globals;
  throw new TidingsError(
    'INVALID_OPTIONS',
    `tidings ${commandName} works on one tenant, and ${globals.configFile} has stamps for ${tenantList(globals)}: name one with --stamp <tenant>`,
  );
}

/** The globals of each stamp a read-only command runs on: every stamp, or the one --stamp names; without stamps, just `globals`. */
export function everyStamp(globals: GlobalOptions): GlobalOptions[] {
  if (globals.stamps.length === 0 || globals.tenant !== undefined) return [globals];
  return globals.stamps.map((stamp) => atStamp(globals, stamp));
}

function stampNamed(globals: GlobalOptions, tenant: string): Stamp {
  if (globals.stamps.length === 0) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `--stamp ${tenant}: no stamps are configured; list them in ${globals.configFile ?? CONFIG_FILE} as {"stamps": {"${tenant}": {"schema": "..."}}}`,
    );
  }
  const stamp = globals.stamps.find((candidate) => candidate.tenant === tenant);
  if (stamp === undefined)
    throw new TidingsError('INVALID_OPTIONS', `--stamp ${tenant}: no such stamp in ${globals.configFile}; the tenants are ${tenantList(globals)}`);
  return stamp;
}

function atStamp(globals: GlobalOptions, stamp: Stamp): GlobalOptions {
  return { ...globals, url: stamp.url, schema: stamp.schema, prefix: stamp.prefix, stream: stamp.stream, tenant: stamp.tenant };
}

function tenantList(globals: GlobalOptions): string {
  return globals.stamps.map((stamp) => stamp.tenant).join(', ');
}

/** `tidings.config.json` in `from` or the nearest folder above it. */
function findConfig(from: string): string | undefined {
  for (let dir = resolve(from); ; dir = dirname(dir)) {
    const candidate = join(dir, CONFIG_FILE);
    if (existsSync(candidate)) return candidate;
    if (dirname(dir) === dir) return undefined;
  }
}

function readConfig(path: string): ConfigFile {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    throw new TidingsError('INVALID_OPTIONS', `${path} is not valid JSON (${(error as Error).message})`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new TidingsError('INVALID_OPTIONS', `${path} must hold a JSON object, for example {"schema": "shop"}`);
  }
  const problems: string[] = [];
  const config = parsed as Record<string, unknown>;
  for (const key of Object.keys(config)) {
    if (!(KEYS as readonly string[]).includes(key)) problems.push(`${key} is not a setting (the settings are ${KEYS.join(', ')})`);
  }
  checkPlace(config, '', problems);
  if (config.connectTimeout !== undefined && !(typeof config.connectTimeout === 'number' && config.connectTimeout > 0))
    problems.push('connectTimeout must be a number of seconds above 0');
  if (config.stamps !== undefined) checkStamps(config.stamps, problems);
  if (problems.length > 0) throw new TidingsError('INVALID_OPTIONS', `${path}: ${problems.join('; ')}`);
  return config as ConfigFile;
}

const STAMPS_EXAMPLE = '{"stamps": {"acme": {"schema": "tidings_acme"}, "globex": {"url": "postgres://host/globex"}}}';

function checkStamps(stamps: unknown, problems: string[]): void {
  if (stamps === null || typeof stamps !== 'object' || Array.isArray(stamps)) {
    problems.push(`stamps must be an object of stamps by tenant, for example ${STAMPS_EXAMPLE}`);
    return;
  }
  const entries = Object.entries(stamps as Record<string, unknown>);
  if (entries.length === 0) problems.push(`stamps is empty: leave it out, or name a stamp per tenant, for example ${STAMPS_EXAMPLE}`);
  for (const [tenant, stamp] of entries) {
    const field = `stamps.${tenant}`;
    if (!TENANT.test(tenant)) problems.push(`${field}: "${tenant}" is not a tenant name (letters, digits, _ . : -; no spaces or slashes)`);
    if (stamp === null || typeof stamp !== 'object' || Array.isArray(stamp)) {
      problems.push(`${field} must be an object with any of ${STAMP_KEYS.join(', ')}, for example {"schema": "tidings_${tenant}"}`);
      continue;
    }
    for (const key of Object.keys(stamp)) {
      if (!(STAMP_KEYS as readonly string[]).includes(key)) problems.push(`${field}.${key} is not a stamp setting (they are ${STAMP_KEYS.join(', ')})`);
    }
    checkPlace(stamp as Record<string, unknown>, `${field}.`, problems);
  }
}

/** url, schema, prefix and stream, at the top of the file or in a stamp (`field` says which). */
function checkPlace(place: Record<string, unknown>, field: string, problems: string[]): void {
  for (const key of STAMP_KEYS) {
    if (place[key] !== undefined && typeof place[key] !== 'string') problems.push(`${field}${key} must be a string`);
  }
  if (typeof place.schema === 'string') {
    try {
      checkIdentifier(`${field}schema`, place.schema);
    } catch (error) {
      problems.push((error as Error).message);
    }
  }
}
