import { loadPackage } from '../../core/packages.ts';
import { listenSessionOn, type Queryable, type SqlDriver } from './driver.ts';

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

/** The driver on PGlite, in process: one session, and no other process to wake. */
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
      return listenSessionOn(database, async () => {
        for (const stop of unlisten) await stop().catch(() => undefined);
      });
    },
    async close() {
      if (own && !database.closed) await database.close();
    },
  };
}
