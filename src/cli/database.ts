/**
 * The CLI's connection: a small pool of its own (so it can bound the time spent connecting), and the
 * judgement of which failures mean "the database cannot be reached" (exit code 3).
 */
import { TidingsError } from '../index.ts';
import { loadPackage } from '../core/packages.ts';
import type { SqlDriver } from '../postgres/connection/driver.ts';
import { connectionError, describeCause, isConnectionError } from '../postgres/connection/errors.ts';
import { pgDriver, type PgPoolLike } from '../postgres/connection/pg.ts';
import { describeUrl } from '../postgres/connection/url.ts';

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

export async function openDatabase(options: OpenOptions): Promise<Database> {
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

export function isUnreachable(error: unknown): boolean {
  if (error instanceof TidingsError) return error.code === 'BACKBONE_UNAVAILABLE';
  const code = (error as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string' && REFUSED_SESSION.test(code)) return true;
  const message = error instanceof Error ? error.message : '';
  return isConnectionError(error) || /timeout exceeded when trying to connect|connection timeout/i.test(message);
}

/** What to tell an operator whose database cannot be reached: the URL tried (no password), why, and what to check. */
export function unreachableMessage(error: unknown, where: { readonly description: string; readonly gaveUpAfterSeconds?: number | undefined }): string {
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
