/**
 * What Tidings needs of a PostgreSQL connection, so the backbone above runs unchanged on a server (pg.ts) or
 * in process (pglite.ts). Beside it: errors.ts (what a failure to reach the server means), identifiers.ts and
 * url.ts (checks of what the user names).
 */

/**
 * The small part of a Postgres client Tidings needs. `pg`'s Pool and PGlite are both adapted to it, so the
 * backbone above runs unchanged on a server or in process.
 */
export interface Queryable {
  query<R = Record<string, unknown>>(text: string, params?: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }>;
}

/**
 * Streams rows into a table with `COPY ... FROM STDIN` (`text`), in the transaction. `rows` holds COPY text, a
 * chunk per item, each produced only when the one before has been handed to the connection, so PostgreSQL
 * ingests one while the next is made.
 */
export type CopyIn = (text: string, rows: Iterable<string>) => Promise<void>;

export type Prepare = <R = Record<string, unknown>>(name: string, text: string, params: readonly unknown[]) => Promise<{ rows: R[]; rowCount?: number | null }>;

/** A connection (or the pool) as Tidings uses it: queries, and what more its client can do. */
export interface Session extends Queryable {
  /** Runs `text` as the prepared statement `name`, where the connection keeps statements prepared (see SqlDriver.prepared). */
  readonly prepared?: Prepare | undefined;
  /** COPY into a table, in the transaction (a server transaction only). */
  readonly copyIn?: CopyIn | undefined;
  /** Statements may be sent without waiting for the answers to the ones before. */
  readonly pipelined?: boolean | undefined;
}

/** The driver as a session whose statements may be prepared. */
export function preparing(driver: SqlDriver): Session {
  if (driver.embedded) return driver;
  return { query: (text, params) => driver.query(text, params), prepared: (name, text, params) => driver.prepared(name, text, params) };
}

/** Runs `text` prepared as `name` where `db` can, and as a plain statement where it cannot. */
function queryPrepared<R = Record<string, unknown>>(
  db: Session,
  name: string,
  text: string,
  params: readonly unknown[],
): Promise<{ rows: R[]; rowCount?: number | null }> {
  return db.prepared === undefined ? db.query<R>(text, params) : db.prepared<R>(name, text, params);
}

/** A statement to run; `name` keeps it prepared on the connection, where the driver can. */
export interface Statement {
  readonly text: string;
  readonly params: readonly unknown[];
  readonly name?: string;
}

/** Runs `statement` on `db`, prepared under its name where `db` can. */
export function runStatement<R = Record<string, unknown>>(db: Session, statement: Statement): Promise<{ rows: R[]; rowCount?: number | null }> {
  const { name, text, params } = statement;
  return name === undefined ? db.query<R>(text, params) : queryPrepared<R>(db, name, text, params);
}

export interface ListenSession {
  /** Sends a notification on this session's own connection. */
  notify(channel: string, payload: string): Promise<void>;
  /** A cheap round trip to prove the connection is alive. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** The ListenSession of a LISTEN made on `db`: notifications are sent and pings made on the same connection. */
export function listenSessionOn(db: Queryable, close: () => Promise<void>): ListenSession {
  return {
    notify: async (channel, payload) => {
      await db.query('select pg_notify($1, $2)', [channel, payload]);
    },
    ping: async () => {
      await db.query('select 1');
    },
    close,
  };
}

interface ListenHandlers {
  /** `fromSelf`: sent by this session's own connection (so by this notifier, which woke its consumers already). */
  onNotification(channel: string, payload: string, fromSelf: boolean): void;
  /** The session's connection ended or failed; the notifier reconnects. */
  onEnd(error: Error | undefined): void;
}

export interface SqlDriver extends Queryable {
  /** True for an in-process database: one session, no other process to wake. */
  readonly embedded: boolean;
  /**
   * Runs a statement the server may keep planned under `name` (a prepared statement per connection): for
   * the hot statements whose planning costs as much as running them. `name` must identify `text`.
   */
  prepared<R = Record<string, unknown>>(name: string, text: string, params: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }>;
  /**
   * As `prepared`, for a read-only statement whose one generic plan is proven good (the consumer's read,
   * test/plans.pg.test.ts): it is planned once per connection, not afresh on each run (PostgreSQL's custom
   * plans cost a quarter of the server's CPU at 1,000 events/s). On a server it runs on connections of
   * their own, whose `plan_cache_mode` is `force_generic_plan`; the pool's (your transactions') keep the default.
   * Given your own pool, Tidings opens no connection beside it: these run on it as `prepared` statements.
   */
  planned<R = Record<string, unknown>>(name: string, text: string, params: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }>;
  /** A description safe to print (no password). */
  readonly description: string;
  /**
   * Runs `fn` in a transaction, and `atCommit`'s statement (if it gives one) last, right before the commit.
   * On a server, the statement travels with COMMIT in one round trip; if `fn` ran nothing, it runs alone
   * and commits by itself, without BEGIN or COMMIT.
   */
  transaction<T>(fn: (tx: Session) => Promise<T>, atCommit?: () => Statement | undefined): Promise<T>;
  /** Opens a dedicated session for LISTEN. */
  listen(channels: readonly string[], handlers: ListenHandlers): Promise<ListenSession>;
  close(): Promise<void>;
}
