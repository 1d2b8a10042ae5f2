/** The servers the run needs: its databases, a machine-wide lock (one run at a time), Redis left clean. */
import { Redis } from 'ioredis';
import pg from 'pg';

/** PostgreSQL as the harness reaches it; the benchmark databases live on it. */
export const SERVER = 'postgres://postgres@127.0.0.1:5432';

/** Creates the benchmark databases if missing (idempotent), so a fresh machine needs nothing else. */
export async function prepareDatabases(syncOff: boolean): Promise<void> {
  const admin = new pg.Client({ connectionString: `${SERVER}/postgres` });
  await admin.connect();
  try {
    for (const [name, asyncCommit] of [
      ['bench', false],
      ['bench_async', true],
    ] as const) {
      if (name === 'bench_async' && !syncOff) continue;
      const { rowCount } = await admin.query('select 1 from pg_database where datname = $1', [name]);
      if (rowCount === 0) await admin.query(`create database ${name}`);
      if (asyncCommit) await admin.query(`alter database ${name} set synchronous_commit = off`);
    }
  } finally {
    await admin.end();
  }
}

/**
 * One benchmark at a time on a machine: two runs would drop each other's schemas and queues. The lock is
 * a PostgreSQL advisory lock held by a session open for the whole run (released if this process dies).
 */
const LOCK_KEY = 0x7469_6469; // 'tidi'
export async function lockMachine(): Promise<pg.Client> {
  const session = new pg.Client({ connectionString: `${SERVER}/postgres`, application_name: 'tidings-bench-lock' });
  session.on('error', () => undefined);
  await session.connect();
  const { rows } = await session.query<{ ok: boolean }>('select pg_try_advisory_lock($1) as ok', [LOCK_KEY]);
  if (rows[0]?.ok !== true) {
    process.stderr.write('Another benchmark run holds the lock on this machine; waiting for it to finish...\n');
    await session.query('select pg_advisory_lock($1)', [LOCK_KEY]);
  }
  return session;
}

/** Removes what an interrupted earlier run left in Redis under the harness's prefix. */
export async function cleanRedis(): Promise<void> {
  const redis = new Redis({ host: '127.0.0.1', port: 6379, lazyConnect: true, maxRetriesPerRequest: 1 });
  try {
    await redis.connect();
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', 'tbench:*', 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.del(...keys);
    } while (cursor !== '0');
  } finally {
    redis.disconnect();
  }
}
