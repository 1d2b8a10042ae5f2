import { TidingsError } from '../../core/errors.ts';

/** Errors Postgres or the network raise when a connection was lost or refused: trying again may work. */
const RETRYABLE_SQLSTATES = new Set(['57P01', '57P02', '57P03', '08000', '08003', '08006', '08001', '08004', '40001', '40P01', '53300']);
const RETRYABLE_NODE_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN']);

export function isConnectionError(error: unknown): boolean {
  const code = (error as { code?: unknown } | undefined)?.code;
  if (typeof code === 'string' && (RETRYABLE_SQLSTATES.has(code) || RETRYABLE_NODE_CODES.has(code))) return true;
  const message = error instanceof Error ? error.message : '';
  return /Connection terminated|connection is closed|Client has encountered a connection error|terminating connection/i.test(message);
}

/** Transaction conflicts: nothing is wrong with the connection, and the same transaction may succeed again. */
const CONFLICT_SQLSTATES = new Set(['40001', '40P01']);
/** SQLSTATE class 28: the server refused the login (no such role, wrong password, pg_hba.conf). */
const LOGIN_REFUSED = /^28/;
/** SQLSTATE 3D000: no database of that name. */
const NO_SUCH_DATABASE = '3D000';

/** The server a driver talks to, safe to print, and where the user gave its settings (to say what to fix). */
export interface Where {
  readonly description: string;
  readonly settingsFrom: string;
}

/**
 * A TidingsError for a failure to reach or use the server, naming it (no password) and saying what to do;
 * any other error is returned as it is. Shared with the CLI (src/cli/database.ts), so the library's errors
 * read like the CLI's. Proven by test/connection.pg.test.ts.
 */
export function connectionError(where: Where, error: unknown): unknown {
  if (error instanceof TidingsError) return error;
  const { description, settingsFrom } = where;
  const code = (error as { code?: unknown } | undefined)?.code;
  const why = describeCause(error);
  if (typeof code === 'string' && LOGIN_REFUSED.test(code)) {
    return new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `PostgreSQL at ${description} refused the login (${why}). Check the user and password in ${settingsFrom}.`,
      { cause: error },
    );
  }
  if (code === NO_SUCH_DATABASE) {
    return new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `PostgreSQL at ${description} has no such database (${why}). Create it, or fix the database name in ${settingsFrom}.`,
      {
        cause: error,
      },
    );
  }
  if (!isConnectionError(error)) return error;
  if (typeof code === 'string' && CONFLICT_SQLSTATES.has(code)) {
    return new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `PostgreSQL at ${description} aborted the transaction (${why}); nothing of it was written, and it may be retried`,
      {
        cause: error,
        retryable: true,
      },
    );
  }
  return new TidingsError(
    'BACKBONE_UNAVAILABLE',
    `PostgreSQL at ${description} is unreachable or dropped the connection (${why}); the operation did not complete and may be retried. If this lasts, check that the server is running and reachable from here, and ${settingsFrom}.`,
    { cause: error, retryable: true },
  );
}

/** Runs `fn`, its failures told as connectionError tells them. */
export async function withConnectionErrors<T>(where: Where, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    throw connectionError(where, error);
  }
}

/** Node reports a refused connection to a name with several addresses as an AggregateError with no message. */
export function describeCause(error: unknown): string {
  if (error instanceof AggregateError && error.message === '') return error.errors.map(describeCause).join('; ') || 'connection failed';
  if (error instanceof Error) return error.message || String((error as { code?: unknown }).code ?? error.name);
  return String(error);
}
