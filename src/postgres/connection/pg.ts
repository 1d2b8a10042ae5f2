import { loadPackage } from '../../core/packages.ts';
import { listenSessionOn, type Queryable, type Session, type SqlDriver } from './driver.ts';
import { connectionError, withConnectionErrors, type Where } from './errors.ts';
import { quoteIdent } from './identifiers.ts';
import { PgSession, type PgClientLike, type PreparingPool } from './pg-session.ts';
import { describeUrl } from './url.ts';

/** The subset of `pg.Pool` used. */
export interface PgPoolLike extends Queryable {
  connect(): Promise<PgClientLike>;
  end(): Promise<void>;
  /** pg's PoolOptions: read for the LISTEN connection's settings. */
  readonly options?: object;
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

/**
 * The driver on a PostgreSQL server through `pg`: statements on a pool (yours, or one it opens), each
 * transaction on one pooled connection (pg-session.ts), LISTEN on a client of its own.
 */
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
  /**
   * The `planned` statements' pool, opened on first use: few connections, each taking statements pipelined.
   * Without JIT: a read returns a batch in a millisecond, and on a log not analyzed yet (just after a bulk
   * load) its estimates passed `jit_above_cost`, and compiling it cost 1.8 s before the first message.
   * Kept open while idle (pg closes an idle connection after 10 s by default): each holds the reads it has
   * planned, and a new one would connect and plan again before the first message after a quiet spell.
   */
  const plannersPool = (): PgPoolLike => {
    if (planners !== undefined) return planners;
    const given = typeof config.options === 'string' ? `${config.options} ` : '';
    planners = new Pool({
      ...config,
      max: PLANNED_CONNECTIONS,
      idleTimeoutMillis: 0,
      keepAlive: true,
      pipeline: true,
      application_name: `tidings-reader:${options.name}`,
      options: `${given}-c plan_cache_mode=force_generic_plan -c jit=off`,
    }) as unknown as PgPoolLike;
    (planners as unknown as { on(e: 'error', l: (e: Error) => void): void }).on('error', () => undefined);
    return planners;
  };

  return {
    embedded: false,
    description,
    query: (text, params) => withConnectionErrors(where, () => pool.query(text, params as unknown[])),
    prepared: (name, text, params) => withConnectionErrors(where, () => (pool as unknown as PreparingPool).query({ name, text, values: params as unknown[] })),
    // Your pool is yours: its connections count against your budget and Tidings opens none beside it, so
    // the planned reads run on it as prepared statements (PostgreSQL's default plan cache mode).
    planned: (name, text, params) =>
      withConnectionErrors(where, () => ((ownPool ? plannersPool() : pool) as unknown as PreparingPool).query({ name, text, values: params as unknown[] })),
    async transaction(fn, atCommit) {
      const client = await withConnectionErrors(where, () => pool.connect());
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
      return listenSessionOn(client, async () => {
        ended = true;
        await client.end().catch(() => undefined);
      });
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
