/**
 * The CLI's connection: a small pool of its own (so it can bound the time spent connecting), opened and
 * closed around each command, and the judgement of which failures mean "the database cannot be reached"
 * (exit code 3) or "no Tidings tables in this schema" (exit code 2, naming the schemas that have them).
 */
import type { Command } from 'commander';
import { TidingsError } from 'tidings';
import type { PgPoolLike, SqlDriver } from 'tidings/postgres';
import { CONFIG_FILE, type GlobalOptions } from './config.ts';
import { type CliContext, globalsOf } from './context.ts';
import { listed } from './format.ts';
import { connectionError, describeCause, describeUrl, isConnectionError, loadPackage, pgDriver, urlProblem } from './internals.ts';

/** Where an operator gives the CLI its database, named in what to fix. */
const SETTINGS_FROM = '--url or DATABASE_URL';

export interface Database {
  readonly driver: SqlDriver;
  /** The URL without its password: safe to print. */
  readonly description: string;
  close(): Promise<void>;
}

interface OpenOptions {
  readonly url: string;
  readonly connectTimeoutMs: number;
}

async function openDatabase(options: OpenOptions): Promise<Database> {
  const pg = await loadPackage(import('pg'), 'pg', 'The tidings CLI');
  const pool = new pg.default.Pool({
    connectionString: options.url,
    max: 3,
    connectionTimeoutMillis: options.connectTimeoutMs,
    application_name: 'tidings:cli',
  });
  // An idle connection that drops is replaced on the next query; without a listener it would crash us.
  pool.on('error', () => undefined);
  const driver = await pgDriver({ pool: pool as unknown as PgPoolLike, poolSize: 3, name: 'cli', settingsFrom: SETTINGS_FROM });
  return { driver, description: describeUrl(options.url), close: () => pool.end() };
}

/** SQLSTATE classes and codes that mean we never got a usable session: wrong login, no such database. */
const REFUSED_SESSION = /^(28|3D000$)/;

function isUnreachable(error: unknown): boolean {
  if (error instanceof TidingsError) return error.code === 'BACKBONE_UNAVAILABLE';
  const code = (error as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string' && REFUSED_SESSION.test(code)) return true;
  const message = error instanceof Error ? error.message : '';
  return isConnectionError(error) || /timeout exceeded when trying to connect|connection timeout/i.test(message);
}

/** What to tell an operator whose database cannot be reached: the URL tried (no password), why, and what to check. */
function unreachableMessage(error: unknown, where: { readonly description: string; readonly gaveUpAfterSeconds?: number | undefined }): string {
  const { description } = where;
  const root = rootCause(error);
  // A refused login or a missing database: the library's own words (src/postgres/connection/errors.ts).
  const explained = connectionError({ description, settingsFrom: SETTINGS_FROM }, root);
  if (explained instanceof TidingsError && !explained.retryable) return explained.message;
  const waited = where.gaveUpAfterSeconds === undefined ? '' : `; no answer within ${where.gaveUpAfterSeconds} s (--connect-timeout)`;
  return `Cannot reach PostgreSQL at ${description} (${describeCause(root)}${waited}). Is the server running and reachable from here? Check ${SETTINGS_FROM}.`;
}

function rootCause(error: unknown): unknown {
  let current = error;
  while (current instanceof TidingsError && current.cause !== undefined) current = current.cause;
  return current;
}

/**
 * Opens the database for one command and closes it after. A failure to reach it becomes a
 * BACKBONE_UNAVAILABLE error that names the URL tried, without its password.
 */
export async function withDatabase(context: CliContext, command: Command, run: (db: Database, globals: GlobalOptions) => Promise<void>): Promise<void> {
  await withDatabaseAt(globalsOf(context, command), run);
}

/** withDatabase at the place `globals` name: one stamp of several (stamps.ts). */
export async function withDatabaseAt<T>(globals: GlobalOptions, run: (db: Database, globals: GlobalOptions) => Promise<T>): Promise<T> {
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
    return await run(db, globals);
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
