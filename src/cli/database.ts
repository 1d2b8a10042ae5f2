/**
 * The CLI's connection: a small pool of its own (so it can bound the time spent connecting), and the
 * judgement of which failures mean "the database cannot be reached" (exit code 3).
 */
import { TidingsError } from '../core/errors.ts';
import { describeUrl, isConnectionError, pgDriver, type PgPoolLike, type SqlDriver } from '../postgres/driver.ts';

export interface Database {
  readonly driver: SqlDriver;
  /** The URL without its password: safe to print. */
  readonly description: string;
  close(): Promise<void>;
}

export interface OpenOptions {
  readonly url: string;
  readonly connectTimeoutMs: number;
}

export async function openDatabase(options: OpenOptions): Promise<Database> {
  const pg = await import('pg').catch((cause: unknown) => {
    throw new TidingsError('BACKBONE_UNAVAILABLE', 'The tidings CLI needs the "pg" package: npm install pg', { cause });
  });
  const pool = new pg.default.Pool({
    connectionString: options.url,
    max: 3,
    connectionTimeoutMillis: options.connectTimeoutMs,
    application_name: 'tidings:cli',
  });
  // An idle connection that drops is replaced on the next query; without a listener it would crash us.
  pool.on('error', () => undefined);
  const driver = await pgDriver({ pool: pool as unknown as PgPoolLike, poolSize: 3, name: 'cli' });
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
  const code = (root as { code?: unknown }).code;
  const why = describeCause(root);
  if (typeof code === 'string' && code.startsWith('28')) {
    return `PostgreSQL at ${description} refused the login (${why}). Check the user and password in --url or DATABASE_URL.`;
  }
  if (code === '3D000') return `PostgreSQL at ${description} has no such database (${why}). Create it, or fix the database name in --url or DATABASE_URL.`;
  const waited = where.gaveUpAfterSeconds === undefined ? '' : `; no answer within ${where.gaveUpAfterSeconds} s (--connect-timeout)`;
  return `Cannot reach PostgreSQL at ${description} (${why}${waited}). Is the server running and reachable from here? Check --url or DATABASE_URL.`;
}

/** Node reports a refused connection to a name with several addresses as an AggregateError with no message. */
function describeCause(error: unknown): string {
  if (error instanceof AggregateError && error.message === '') return error.errors.map(describeCause).join('; ') || 'connection failed';
  if (error instanceof Error) return error.message || String((error as { code?: unknown }).code ?? error.name);
  return String(error);
}

function rootCause(error: unknown): unknown {
  let current = error;
  while (current instanceof TidingsError && current.cause !== undefined) current = current.cause;
  return current;
}
