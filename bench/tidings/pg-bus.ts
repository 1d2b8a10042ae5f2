/** The bus every Tidings-on-PostgreSQL child makes: the compiled build, the benchmark's schema (dropped by each task). */
import type { Bus } from '../../src/index.ts';
import type { PgTransaction } from '../../src/postgres/index.ts';
import { monitorClient } from '../load/pg.ts';
import type { Task } from '../protocol.ts';
import { tidings } from './build.ts';
import { telemetryOf } from './telemetry.ts';

const { createBus } = await tidings<typeof import('../../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../../src/postgres/index.ts')>('postgres/index');

export const SCHEMA = 'tidings_bench';

export function newBus(task: Task, service = 'bench'): Bus<PgTransaction> {
  const tenancy = task.variant.rls === true ? { tenancy: { isolation: 'rls' as const } } : {};
  return createBus({ service, backbone: postgres({ url: task.pgUrl, schema: SCHEMA, ...tenancy }), telemetry: telemetryOf(task.variant) });
}

/** The tenant of event `seq` in a variant with tenants (`t0` ... `t<n-1>`, in turn), else none. */
export function tenantOf(task: Task, seq: number): { tenant?: string } {
  const tenants = task.variant.tenants ?? 0;
  return tenants > 0 ? { tenant: `t${seq % tenants}` } : {};
}

/**
 * With row-level security, handlers' `ctx.tx` logs in as the restricted role (`tidings_tenant` by default),
 * which may touch only what it is granted: the RLS rows' handlers insert into the effects table.
 */
export async function grantEffects(task: Task): Promise<void> {
  const client = await monitorClient(task.pgUrl);
  try {
    await client.query(
      "do $$ begin if not exists (select from pg_roles where rolname = 'tidings_tenant') then create role tidings_tenant login; end if; end $$",
    );
    await client.query('grant insert on bench_effects to tidings_tenant');
  } finally {
    await client.end();
  }
}
