import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { TidingsError } from '../core/errors.ts';
import { loadPackage } from '../core/packages.ts';

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

// ---- pg ------------------------------------------------------------------------------------------

/** The subset of `pg.PoolClient` used. */
interface PgClientLike extends Queryable {
  release(error?: Error | boolean): void;
  on(event: 'error', listener: (error: Error) => void): unknown;
  off(event: 'error', listener: (error: Error) => void): unknown;
}

/** The subset of `pg.Pool` used. */
export interface PgPoolLike extends Queryable {
  connect(): Promise<PgClientLike>;
  end(): Promise<void>;
  /** pg's PoolOptions: read for the LISTEN connection's settings. */
  readonly options?: object;
}

interface PreparingPool {
  query<R>(config: { name: string; text: string; values: unknown[] }): Promise<{ rows: R[]; rowCount?: number | null }>;
}

interface PgListenClient extends Queryable {
  connect(): Promise<void>;
  end(): Promise<void>;
  on(event: 'notification', listener: (message: { channel: string; payload?: string; processId: number }) => void): void;
  on(event: 'error' | 'end', listener: (error?: Error) => void): void;
}

interface PgDriverOptions {
  /** Shown in pg_stat_activity as `tidings:<name>`, `tidings-reader:<name>` (the consumers' reads) and `tidings-notifier:<name>`. */
  name: string;
  /** A connection URL; Tidings opens and closes its own pool. */
  url?: string | undefined;
  /** Your pool: Tidings uses it and leaves it open. */
  pool?: PgPoolLike | undefined;
  poolSize: number;
  /** Where the user gave the connection settings, named in connection errors (default: `postgres({ url })`, or your pool's settings). */
  settingsFrom?: string | undefined;
}

export async function pgDriver(options: PgDriverOptions): Promise<SqlDriver> {
  const pg = await loadPackage(import('pg'), 'pg', 'The postgres backbone');
  const { from: copyFrom } = await loadPackage(import('pg-copy-streams'), 'pg-copy-streams', 'The postgres backbone');
  const Pool = pg.default.Pool;
  const Client = pg.default.Client;
  const ownPool = options.pool === undefined;
  const pool: PgPoolLike =
    options.pool ??
    (new Pool({
      connectionString: options.url,
      max: options.poolSize,
      keepAlive: true,
      pipeline: true,
      application_name: `tidings:${options.name}`,
    }) as unknown as PgPoolLike);
  if (ownPool) (pool as unknown as { on(e: 'error', l: (e: Error) => void): void }).on('error', () => undefined);
  const config: Record<string, unknown> = options.url !== undefined ? { connectionString: options.url } : { ...pool.options };
  const description = describeUrl(options.url ?? (typeof config.connectionString === 'string' ? config.connectionString : undefined), config);
  let closing: Promise<void> | undefined;
  const where: Where = { description, settingsFrom: options.settingsFrom ?? (options.url !== undefined ? 'postgres({ url })' : "your pool's settings") };

  let planners: PgPoolLike | undefined;
  /** The `planned` statements' pool, opened on first use: few connections, each taking statements pipelined. */
  const plannersPool = (): PgPoolLike => {
    if (planners !== undefined) return planners;
    const given = typeof config.options === 'string' ? `${config.options} ` : '';
    planners = new Pool({
      ...config,
      max: PLANNED_CONNECTIONS,
      keepAlive: true,
      pipeline: true,
      application_name: `tidings-reader:${options.name}`,
      options: `${given}-c plan_cache_mode=force_generic_plan`,
    }) as unknown as PgPoolLike;
    (planners as unknown as { on(e: 'error', l: (e: Error) => void): void }).on('error', () => undefined);
    return planners;
  };

  return {
    embedded: false,
    description,
    query: (text, params) => wrap(where, () => pool.query(text, params as unknown[])),
    prepared: (name, text, params) => wrap(where, () => (pool as unknown as PreparingPool).query({ name, text, values: params as unknown[] })),
    planned: (name, text, params) => wrap(where, () => (plannersPool() as unknown as PreparingPool).query({ name, text, values: params as unknown[] })),
    async transaction(fn, atCommit) {
      const client = await wrap(where, () => pool.connect());
      let broken: Error | undefined;
      // A checked-out connection that dies between statements emits 'error' with no query to reject:
      // without a listener that would crash the process. The next statement fails instead.
      const onError = (error: Error) => {
        broken = error;
      };
      client.on('error', onError);
      const session = new PgSession(client, copyFrom);
      const tx: Session = {
        query: (text, params) => session.run({ text, params: params ?? [] }),
        prepared: (name, text, params) => session.run({ name, text, params }),
        pipelined: session.pipelined,
        copyIn: (text, rows) => session.copy(text, rows),
      };
      try {
        const result = await fn(tx);
        await session.commit(atCommit?.());
        return result;
      } catch (error) {
        try {
          await session.rollback();
        } catch (rollbackError) {
          broken = rollbackError as Error;
        }
        throw connectionError(where, error);
      } finally {
        client.off('error', onError);
        client.release(broken ?? false);
      }
    },
    async listen(channels, handlers) {
      const client = new Client({ ...config, keepAlive: true, application_name: `tidings-notifier:${options.name}` }) as unknown as PgListenClient;
      let ended = false;
      const end = (error?: Error) => {
        if (ended) return;
        ended = true;
        handlers.onEnd(error);
      };
      const own = client as unknown as { processID: number | null };
      client.on('notification', (message) =>
        handlers.onNotification(message.channel, message.payload ?? '', own.processID !== null && message.processId === own.processID),
      );
      client.on('error', (error) => end(error ?? new Error('listen connection failed')));
      client.on('end', () => end(new Error('listen connection ended')));
      try {
        await client.connect();
        for (const channel of channels) await client.query(`listen ${quoteIdent(channel)}`);
      } catch (error) {
        ended = true;
        await client.end().catch(() => undefined);
        throw connectionError(where, error);
      }
      return {
        notify: async (channel, payload) => {
          await client.query('select pg_notify($1, $2)', [channel, payload]);
        },
        ping: async () => {
          await client.query('select 1');
        },
        close: async () => {
          ended = true;
          await client.end().catch(() => undefined);
        },
      };
    },
    close() {
      // Once: pg throws "Called end on pool more than once" at a second end.
      closing ??= Promise.all([ownPool ? pool.end() : undefined, planners?.end()]).then(() => undefined);
      return closing;
    },
  };
}

/**
 * Connections of the `planned` statements' pool. Each consumer has at most two reads in flight (one sent
 * ahead), each a few milliseconds at most; two connections serve a process's consumers without adding much
 * to the server's connection count.
 */
const PLANNED_CONNECTIONS = 2;

const BEGIN: Statement = { text: 'begin', params: [] };
const COMMIT: Statement = { text: 'commit', params: [] };
const ROLLBACK: Statement = { text: 'rollback', params: [] };
/** SQLSTATE 25P02: a statement sent after one that failed in the same transaction. */
const IN_FAILED_TRANSACTION = '25P02';

function rolledBack(cause?: unknown): TidingsError {
  return new TidingsError(
    'ROLLED_BACK',
    'The transaction was rolled back, not committed: a statement in it failed and the callback caught the error; nothing of it was written',
    cause === undefined ? {} : { cause },
  );
}

interface PipelinedClient {
  /** pg's `pipeline: true`: statements are sent without waiting for the answers to the ones before. */
  readonly pipeline?: boolean;
  readonly connection?: { readonly stream?: { cork?(): void; uncork?(): void } };
}

/**
 * A transaction on one pooled connection that spends as few round trips as it can: BEGIN travels with the
 * first statement, the last statement with COMMIT, and a transaction whose only statement is the last one
 * runs it alone (a single statement commits by itself). Each round trip costs a socket write on both
 * sides, and on a small machine those writes are a third of the CPU a transaction costs; see bench/README.md.
 * On a pool that does not pipeline (one you gave without `pipeline: true`), the same statements go one by one.
 */
class PgSession {
  #begun = false;
  /** A COPY in progress: the connection takes nothing else until it ends, so statements wait for it, in order. */
  #copying: Promise<void> | undefined;
  /** The last statement sent: once it is answered, so are all before it. */
  #last: Promise<unknown> | undefined;

  constructor(
    private readonly client: PgClientLike,
    private readonly copyFrom: (text: string) => NodeJS.WritableStream,
  ) {}

  get pipelined(): boolean {
    return this.#corkable() !== undefined;
  }

  run<R>(statement: Statement): Promise<{ rows: R[]; rowCount?: number | null }> {
    if (this.#copying !== undefined) return this.#copying.then(() => this.run<R>(statement));
    if (this.#begun) return this.#send<R>(statement);
    this.#begun = true;
    return this.#sendAll<R>([BEGIN, statement]);
  }

  /** Streams `rows` into `COPY ... FROM STDIN` (see CopyIn); a failure aborts the transaction. */
  copy(text: string, rows: Iterable<string>): Promise<void> {
    if (this.#copying !== undefined) return this.#copying.then(() => this.copy(text, rows));
    const copying = this.#copy(text, rows);
    const settled = copying.catch(() => undefined);
    this.#copying = settled;
    void settled.then(() => {
      if (this.#copying === settled) this.#copying = undefined;
    });
    return copying;
  }

  async #copy(text: string, rows: Iterable<string>): Promise<void> {
    if (!this.#begun) {
      this.#begun = true;
      this.#send(BEGIN).catch(() => undefined); // a failed BEGIN fails the COPY too
    }
    // pg refuses a COPY among pipelined statements: once those sent are answered, it goes alone.
    await this.#last?.catch(() => undefined);
    const client = this.client as unknown as { pipeline?: boolean; query(submittable: NodeJS.WritableStream): unknown };
    const pipelined = client.pipeline === true;
    if (pipelined) client.pipeline = false;
    try {
      const stream = this.copyFrom(text);
      const streamed = pipeline(Readable.from(rows), stream);
      client.query(stream);
      await streamed;
    } finally {
      if (pipelined) client.pipeline = true;
    }
  }

  async commit(last: Statement | undefined): Promise<void> {
    if (this.#copying !== undefined) await this.#copying;
    if (!this.#begun) {
      if (last !== undefined) await this.#send(last);
      return;
    }
    if (this.#status() === 'E') throw rolledBack();
    let outcome: { command?: string };
    try {
      outcome = (await this.#sendAll<never>(last === undefined ? [COMMIT] : [last, COMMIT])) as { command?: string };
    } catch (error) {
      if ((error as { code?: unknown }).code === IN_FAILED_TRANSACTION) throw rolledBack(error);
      throw error;
    }
    // COMMIT of a transaction in which a statement failed rolls it back.
    if (outcome.command === 'ROLLBACK') throw rolledBack();
  }

  /** Ends the transaction if it is still open (a pipelined COMMIT ends it even when a statement before it failed). */
  async rollback(): Promise<void> {
    if (this.#copying !== undefined) await this.#copying;
    if (!this.#begun || this.#status() === 'I') return;
    await this.#send(ROLLBACK);
  }

  /** The socket, when the client pipelines and statements can be gathered into one write on it. */
  #corkable(): { cork(): void; uncork(): void } | undefined {
    const { pipeline, connection } = this.client as PipelinedClient;
    const stream = connection?.stream;
    return pipeline === true && stream?.cork !== undefined && stream.uncork !== undefined ? (stream as { cork(): void; uncork(): void }) : undefined;
  }

  /** The server's last word on the transaction: 'I' idle, 'T' in one, 'E' in a failed one (undefined if the client does not say). */
  #status(): string | undefined {
    return (this.client as { getTransactionStatus?(): string | null }).getTransactionStatus?.() ?? undefined;
  }

  #send<R>(statement: Statement): Promise<{ rows: R[]; rowCount?: number | null }> {
    const { client } = this;
    const sent =
      statement.name === undefined
        ? client.query<R>(statement.text, statement.params)
        : (client as unknown as PreparingPool).query<R>({ name: statement.name, text: statement.text, values: statement.params as unknown[] });
    this.#last = sent;
    return sent;
  }

  /** Sends statements in one write and one round trip where the connection pipelines; resolves with the last one's result. */
  async #sendAll<R>(statements: readonly Statement[]): Promise<{ rows: R[]; rowCount?: number | null }> {
    const stream = this.#corkable();
    if (stream === undefined) {
      let result: { rows: R[]; rowCount?: number | null } | undefined;
      for (const statement of statements) result = await this.#send<R>(statement);
      return result!;
    }
    stream.cork();
    let sent: Array<Promise<{ rows: R[]; rowCount?: number | null }>>;
    try {
      sent = statements.map((statement) => this.#send<R>(statement));
    } finally {
      stream.uncork();
    }
    const settled = await Promise.allSettled(sent);
    const failed = settled.find((outcome) => outcome.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
    return (settled[settled.length - 1] as PromiseFulfilledResult<{ rows: R[]; rowCount?: number | null }>).value;
  }
}

// ---- PGlite --------------------------------------------------------------------------------------

/** The subset of PGlite used. */
export interface PGliteLike extends Queryable {
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>;
  listen(channel: string, callback: (payload: string) => void): Promise<() => Promise<void>>;
  close(): Promise<void>;
  readonly closed?: boolean;
}

interface PgliteDriverOptions {
  /** Your PGlite instance: Tidings uses it and leaves it open. */
  db?: PGliteLike | undefined;
  /** Where a PGlite Tidings opens keeps its files; in memory when absent. */
  dataDir?: string | undefined;
}

export async function pgliteDriver(options: PgliteDriverOptions): Promise<SqlDriver> {
  let db = options.db;
  const own = db === undefined;
  if (db === undefined) {
    const module = await loadPackage(import('@electric-sql/pglite'), '@electric-sql/pglite', 'Embedded PostgreSQL (postgres({ pglite: true }))');
    db = (await module.PGlite.create(options.dataDir === undefined ? {} : { dataDir: options.dataDir })) as unknown as PGliteLike;
  }
  const database = db;
  return {
    embedded: true,
    description: `PGlite (${options.dataDir ?? 'in memory'})`,
    query: (text, params) => database.query(text, params as unknown[]),
    prepared: (_name, text, params) => database.query(text, params as unknown[]),
    planned: (_name, text, params) => database.query(text, params as unknown[]),
    transaction: (fn, atCommit) =>
      database.transaction(async (tx) => {
        const result = await fn(tx);
        const last = atCommit?.();
        if (last !== undefined) await tx.query(last.text, last.params);
        return result;
      }),
    async listen(channels, handlers) {
      const unlisten: Array<() => Promise<void>> = [];
      for (const channel of channels) {
        unlisten.push(await database.listen(channel, (payload) => handlers.onNotification(channel, payload, false)));
      }
      return {
        notify: async (channel, payload) => {
          await database.query('select pg_notify($1, $2)', [channel, payload]);
        },
        ping: async () => {
          await database.query('select 1');
        },
        close: async () => {
          for (const stop of unlisten) await stop().catch(() => undefined);
        },
      };
    },
    async close() {
      if (own && !database.closed) await database.close();
    },
  };
}

// ---- helpers -------------------------------------------------------------------------------------

const IDENT = /^[a-z_][a-z0-9_]{0,62}$/;

/** Validates an identifier Tidings puts in SQL text (schema, channel): never interpolate anything else. */
export function checkIdentifier(kind: string, name: string): string {
  if (!IDENT.test(name)) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `${kind} ${JSON.stringify(name)} is invalid: use lower-case letters, digits and "_", starting with a letter, at most 63 characters`,
    );
  }
  return name;
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

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
interface Where {
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

async function wrap<T>(where: Where, fn: () => Promise<T>): Promise<T> {
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

/**
 * Why `url` cannot be a PostgreSQL connection URL, or undefined when it can. pg itself takes any text (a
 * `mysql://` URL or a typo becomes a connection to some host): refused here, when the backbone is made.
 * The message never repeats the URL, which may hold a password.
 */
export function urlProblem(url: unknown): string | undefined {
  const example = 'for example postgres://user:password@host:5432/database';
  if (typeof url !== 'string' || url.trim() === '') return `url must be a PostgreSQL connection URL, ${example}`;
  if (url.startsWith('/')) return undefined; // a Unix socket directory, as pg takes it
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url)?.[1]?.toLowerCase();
  if (scheme === undefined) return `url is not a URL: it must start with postgres:// or postgresql://, ${example}`;
  if (scheme !== 'postgres' && scheme !== 'postgresql' && scheme !== 'socket')
    return `url must be a PostgreSQL URL (postgres:// or postgresql://), not ${scheme}://; ${example}`;
  // A URL with no host (the socket given as ?host=/var/run/postgresql) is valid for pg, not for URL.
  if (!URL.canParse(url) && !URL.canParse(url.replace('@/', '@localhost/'))) {
    return `url cannot be parsed as a URL: percent-encode special characters in the user name and password (encodeURIComponent), ${example}`;
  }
  return undefined;
}

/** `postgres://user@host:port/db`, without the password. */
export function describeUrl(url: string | undefined, config: Record<string, unknown> = {}): string {
  if (url !== undefined) {
    try {
      const parsed = new URL(url);
      parsed.password = '';
      return parsed.toString().replace(/:@/, '@');
    } catch {
      return 'the configured URL (unparseable)';
    }
  }
  const host = String(config.host ?? process.env.PGHOST ?? 'localhost');
  const port = String(config.port ?? process.env.PGPORT ?? 5432);
  const database = String(config.database ?? process.env.PGDATABASE ?? '');
  const user = String(config.user ?? process.env.PGUSER ?? '');
  return `postgres://${user ? `${user}@` : ''}${host}:${port}/${database}`;
}
