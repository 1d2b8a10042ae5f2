/**
 * Where the CLI's global settings come from, first found wins: the command line (`--schema`), the
 * environment (`TIDINGS_SCHEMA`, `DATABASE_URL`), a `tidings.config.json` in the current folder or the
 * nearest folder above it (or `--config <file>`), then the defaults. So `--schema` need not be repeated.
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

/** The settings a config file may hold: the global options' long names. */
interface ConfigFile {
  url?: string;
  schema?: string;
  connectTimeout?: number;
  prefix?: string;
  stream?: string;
}

const KEYS = ['url', 'schema', 'connectTimeout', 'prefix', 'stream'] as const satisfies readonly (keyof ConfigFile)[];

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
}

export function resolveGlobals(given: GivenOptions, env: NodeJS.ProcessEnv, cwd: string): GlobalOptions {
  const path = given.config !== undefined ? resolve(cwd, given.config) : findConfig(cwd);
  if (given.config !== undefined && !existsSync(path!)) throw new TidingsError('INVALID_OPTIONS', `--config ${given.config}: no such file`);
  const file = path === undefined ? {} : readConfig(path);
  const envSchema = env.TIDINGS_SCHEMA === '' ? undefined : env.TIDINGS_SCHEMA;
  if (envSchema !== undefined) checkIdentifier('TIDINGS_SCHEMA', envSchema);
  const envUrl = env.DATABASE_URL === '' ? undefined : env.DATABASE_URL;
  return {
    url: given.url ?? envUrl ?? file.url,
    schema: given.schema ?? envSchema ?? file.schema ?? cliDefaults.schema,
    json: given.json === true,
    connectTimeout: given.connectTimeout ?? file.connectTimeout ?? cliDefaults.connectTimeout,
    prefix: given.prefix ?? file.prefix,
    stream: given.stream ?? file.stream,
    configFile: path,
  };
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
  for (const key of ['url', 'schema', 'prefix', 'stream'] as const) {
    if (config[key] !== undefined && typeof config[key] !== 'string') problems.push(`${key} must be a string`);
  }
  if (config.connectTimeout !== undefined && !(typeof config.connectTimeout === 'number' && config.connectTimeout > 0))
    problems.push('connectTimeout must be a number of seconds above 0');
  if (typeof config.schema === 'string') {
    try {
      checkIdentifier('schema', config.schema);
    } catch (error) {
      problems.push((error as Error).message);
    }
  }
  if (problems.length > 0) throw new TidingsError('INVALID_OPTIONS', `${path}: ${problems.join('; ')}`);
  return config as ConfigFile;
}
