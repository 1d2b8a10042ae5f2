/**
 * PostgreSQL helpers of the children: counting the queries a system sends (idle cost), a monitor client
 * that is not counted, the idle window, the effects table of the guarantee rows, a fresh schema per task.
 */
import pg from 'pg';
import type { Task } from '../protocol.ts';
import { now, sleep } from './measure.ts';

/**
 * Every query any `pg` client of this process sends (Tidings, pg-boss and graphile-worker all use the one
 * `pg` package installed), for the idle-cost measure. Clients of the harness itself opt out.
 */
let queriesSent = 0;
const SKIP = Symbol('bench-skip-count');
{
  const proto = pg.Client.prototype as unknown as { query: (...args: unknown[]) => unknown; [SKIP]?: boolean };
  const original = proto.query;
  proto.query = function patched(this: { [SKIP]?: boolean }, ...args: unknown[]) {
    if (this[SKIP] !== true) queriesSent++;
    return original.apply(this, args);
  };
}
export function queriesSoFar(): number {
  return queriesSent;
}

/** A client for the harness's own checks: not counted as the system's queries. */
export async function monitorClient(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url });
  (client as unknown as Record<symbol, boolean>)[SKIP] = true;
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

/**
 * Queries per second a PostgreSQL system sends while idle: counted in this process (every `pg` query),
 * and transactions per second from pg_stat_database (which backends flush at most once a second, so
 * the window edges blur it a little).
 */
export async function idlePg(task: Task): Promise<Record<string, number>> {
  if (task.idleSeconds <= 0) return {};
  const monitor = await monitorClient(task.pgUrl);
  try {
    const xacts = async () => {
      const { rows } = await monitor.query<{ n: string }>('select xact_commit + xact_rollback as n from pg_stat_database where datname = $1', [task.database]);
      return Number(rows[0]?.n ?? 0);
    };
    // A backend that goes idle less than a second after its last stats flush defers the next one by
    // 10 s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL): wait that out, or the traffic just before would be
    // counted as idle transactions. Quick runs skip the server-side figure instead of waiting.
    const serverSide = !task.quick;
    await sleep(serverSide ? 11_000 : 1_500);
    await monitor.query('select pg_stat_clear_snapshot()');
    const x0 = await xacts();
    const q0 = queriesSoFar();
    const t0 = now();
    await sleep(task.idleSeconds * 1000);
    const q1 = queriesSoFar();
    const seconds = (now() - t0) / 1000;
    if (!serverSide) return { idleQueries: (q1 - q0) / seconds };
    await sleep(11_000); // the idle window's own transactions are flushed by then
    await monitor.query('select pg_stat_clear_snapshot()');
    const x1 = await xacts();
    // Over window + wait, less the monitor's own transactions (the reads and the clears).
    return { idleQueries: (q1 - q0) / seconds, idleXacts: Math.max(0, x1 - x0 - 3) / (seconds + 11) };
  } finally {
    await monitor.end();
  }
}

/** The table the guarantee rows' handlers insert into, emptied. */
export async function ensureEffectsTable(url: string): Promise<void> {
  const client = await monitorClient(url);
  try {
    await client.query('create table if not exists bench_effects (id text primary key, at timestamptz not null default now())');
    await client.query('truncate bench_effects');
  } finally {
    await client.end();
  }
}

/**
 * The business row of workload 3's "business row + event" rows: what an application's transaction writes
 * beside its event (an order, a payment). Every system, and the raw floor, inserts the same row.
 */
export const BUSINESS_INSERT = 'insert into bench_business (seq, note) values ($1, $2)';
export const BUSINESS_NOTE = 'order placed';

async function ensureBusinessTable(client: pg.Client): Promise<void> {
  await client.query(
    'create table if not exists bench_business (id bigserial primary key, seq bigint not null, note text not null, at timestamptz not null default now())',
  );
  await client.query('truncate bench_business');
}

/**
 * Drops a system's schema (every task starts from nothing) and empties the tables the task's variant writes
 * besides it (the effects of the guarantee rows, the business rows).
 */
export async function freshSchema(task: Task, schema: string): Promise<void> {
  const client = await monitorClient(task.pgUrl);
  try {
    await client.query(`drop schema if exists ${schema} cascade`);
    if (task.variant.businessRow === true) await ensureBusinessTable(client);
  } finally {
    await client.end();
  }
  if (task.variant.effects) await ensureEffectsTable(task.pgUrl);
}
