/**
 * Operating tenants from outside their services (the CLI's `tidings tenants`, a console, a billing job):
 * list them, show one's usage, suspend and resume its delivery, export its messages, and purge everything
 * Tidings keeps of it (an erasure request). Every suspend, resume, purge and export writes an audit row
 * (`tenant_actions`) in the transaction of the change it records. docs/tenancy.md.
 *
 * Glossary: *suspended* - a tenant whose messages consumers hold (in `held`, at the head of their key)
 * instead of handling; *resume* makes those heads due at once, so they are handled in their keys' order.
 */
import type { Envelope } from '../../core/envelope.ts';
import { TidingsError } from '../../core/errors.ts';
import { checkTenant } from '../../core/tenant.ts';
import type { Queryable, SqlDriver } from '../connection/driver.ts';
import { iso, toEnvelope, type LogRow } from '../codec.ts';
import { schemaOf } from '../sql/schema.ts';
import { defaultActor } from './chunks.ts';
import { explainMissingSchema } from './schema.ts';
import { generationStatements, metaStatements, replicaBase } from '../../replica/sql.ts';

export interface TenantSummary {
  readonly tenant: string;
  /** Messages of the tenant in the log (as retention keeps it). */
  readonly messages: number;
  readonly lastMessageAt: string | undefined;
  readonly suspendedAt: string | undefined;
}

export interface TenantUsage extends TenantSummary {
  /** Bytes of the messages' data (JSON) in the log: what a bill by volume counts. */
  readonly bytes: number;
  /** Messages of the tenant each subscription handled (its inbox records, as retention keeps them). */
  readonly handled: Readonly<Record<string, number>>;
  readonly deadLetters: number;
  /** Messages waiting: for a retry, or because the tenant is suspended. */
  readonly held: number;
  readonly scheduled: number;
  readonly sagas: number;
  /** Rows of the tenant in each replica (src/replica), by replica name: the generation readers see. */
  readonly replicas: Readonly<Record<string, number>>;
  readonly suspendedBy: string | undefined;
  readonly reason: string | undefined;
  /** Its publish quota's bucket (`tenancy.quotas`): the tokens left by its last publish, and when; undefined if it has none. */
  readonly quota: { readonly tokens: number; readonly at: string } | undefined;
  /** The last actions on the tenant, newest first. */
  readonly actions: ReadonlyArray<{ readonly action: string; readonly actor: string; readonly at: string; readonly detail: unknown }>;
}

interface TenantOptions {
  readonly schema: string;
  readonly tenant: string;
}

interface ActingOptions extends TenantOptions {
  /** Who runs it, for the audit row; by default the OS user and host (`alice@ops-1`). */
  readonly actor?: string | undefined;
}

/** Every tenant with messages in the log or a suspension on record, by name. */
export async function listTenants(db: Queryable, options: { schema: string }): Promise<TenantSummary[]> {
  const s = schemaOf(options.schema);
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<{ tenant: string; messages: string | number; last_at: Date | string | null; suspended_at: Date | string | null }>(
      `select coalesce(l.tenant, t.tenant) as tenant, coalesce(l.messages, 0) as messages, l.last_at, t.suspended_at
       from (select tenant, count(*)::int8 as messages, max(time) as last_at from ${s}.log where tenant is not null group by tenant) l
       full join ${s}.tenants t on t.tenant = l.tenant
       order by 1`,
    );
    return rows.map((row) => ({
      tenant: row.tenant,
      messages: Number(row.messages),
      lastMessageAt: row.last_at === null ? undefined : iso(row.last_at),
      suspendedAt: row.suspended_at === null ? undefined : iso(row.suspended_at),
    }));
  });
}

/** One tenant's usage and state: what a bill or a support request needs. */
export async function showTenant(db: Queryable, options: TenantOptions): Promise<TenantUsage> {
  const s = schemaOf(options.schema);
  const tenant = checkTenant(options.tenant, 'tidings tenants show');
  return explainMissingSchema(options.schema, async () => {
    const one = async (sql: string) => Number((await db.query<{ n: string | number }>(sql, [tenant])).rows[0]?.n ?? 0);
    const [log, handled, deadLetters, held, scheduled, sagas, state, actions, quota, replicas] = await Promise.all([
      db.query<{ messages: string | number; bytes: string | number; last_at: Date | string | null }>(
        `select count(*)::int8 as messages, coalesce(sum(octet_length(data::text)), 0)::int8 as bytes, max(time) as last_at from ${s}.log where tenant = $1`,
        [tenant],
      ),
      db.query<{ subscription: string; n: string | number }>(
        // Per subscription, so each lookup uses the inbox's primary key (subscription, message_id).
        `select sub.name as subscription, (select count(*) from ${s}.log l join ${s}.inbox i on i.subscription = sub.name and i.message_id = l.id where l.tenant = $1)::int8 as n
         from ${s}.subscriptions sub order by sub.name`,
        [tenant],
      ),
      one(`select count(*)::int8 as n from ${s}.dead_letters where tenant = $1`),
      one(
        `select count(*)::int8 as n from ${s}.held h where coalesce(h.message ->> 'tenant', (select l.tenant from ${s}.log l where l.position = h.position)) = $1`,
      ),
      one(`select count(*)::int8 as n from ${s}.scheduled where tenant = $1`),
      one(`select count(*)::int8 as n from ${s}.sagas where tenant = $1`),
      db.query<{ suspended_at: Date | string | null; suspended_by: string | null; reason: string | null }>(
        `select suspended_at, suspended_by, reason from ${s}.tenants where tenant = $1`,
        [tenant],
      ),
      db.query<{ action: string; actor: string; at: Date | string; detail: unknown }>(
        `select action, actor, at, detail from ${s}.tenant_actions where tenant = $1 order by id desc limit 10`,
        [tenant],
      ),
      db.query<{ tokens: number; refilled_at: Date | string }>(`select tokens, refilled_at from ${s}.tenant_quotas where tenant = $1`, [tenant]),
      replicaCounts(db, options.schema, tenant),
    ]);
    const bucket = quota.rows[0];
    const row = log.rows[0];
    const suspension = state.rows[0];
    return {
      tenant,
      messages: Number(row?.messages ?? 0),
      bytes: Number(row?.bytes ?? 0),
      lastMessageAt: row?.last_at ? iso(row.last_at) : undefined,
      suspendedAt: suspension?.suspended_at ? iso(suspension.suspended_at) : undefined,
      suspendedBy: suspension?.suspended_by ?? undefined,
      reason: suspension?.reason ?? undefined,
      quota: bucket === undefined ? undefined : { tokens: Number(bucket.tokens), at: iso(bucket.refilled_at) },
      handled: Object.fromEntries(handled.rows.map((entry) => [entry.subscription, Number(entry.n)])),
      deadLetters,
      held,
      scheduled,
      sagas,
      replicas,
      actions: actions.rows.map((action) => ({ action: action.action, actor: action.actor, at: iso(action.at), detail: action.detail })),
    };
  });
}

/**
 * Suspends a tenant's delivery: consumers hold its messages (each key's order kept) while the others flow,
 * from their next batch on (workers learn it by the `!tenants` signal, or within a heartbeat). Publishing
 * for it still works. False if it was suspended already.
 */
export async function suspendTenant(db: SqlDriver, options: ActingOptions & { readonly reason?: string | undefined }): Promise<{ suspended: boolean }> {
  const s = schemaOf(options.schema);
  const tenant = checkTenant(options.tenant, 'tidings tenants suspend');
  return explainMissingSchema(options.schema, () =>
    db.transaction(async (tx) => {
      const { rows } = await tx.query(
        `insert into ${s}.tenants as t (tenant, suspended_at, suspended_by, reason) values ($1, now(), $2, $3)
         on conflict (tenant) do update set suspended_at = now(), suspended_by = excluded.suspended_by, reason = excluded.reason where t.suspended_at is null
         returning tenant`,
        [tenant, options.actor ?? defaultActor(), options.reason ?? null],
      );
      if (rows.length === 0) return { suspended: false };
      await audit(tx, s, 'suspend', tenant, options.actor ?? defaultActor(), { reason: options.reason ?? null });
      await tx.query('select pg_notify($1, $2)', [options.schema, '!tenants']);
      return { suspended: true };
    }),
  );
}

/**
 * Resumes a suspended tenant: the messages its suspension held become due at once and are handled in their
 * keys' order, by whichever worker holds their partition. `released`: the keys made due.
 */
export async function resumeTenant(db: SqlDriver, options: ActingOptions): Promise<{ resumed: boolean; released: number }> {
  const s = schemaOf(options.schema);
  const tenant = checkTenant(options.tenant, 'tidings tenants resume');
  return explainMissingSchema(options.schema, () =>
    db.transaction(async (tx) => {
      const { rows } = await tx.query(
        `update ${s}.tenants set suspended_at = null, suspended_by = null, reason = null where tenant = $1 and suspended_at is not null returning tenant`,
        [tenant],
      );
      if (rows.length === 0) return { resumed: false, released: 0 };
      // The heads a suspension left waiting (no due time) of this tenant's messages, per subscription and key.
      const { rows: released } = await tx.query<{ subscription: string }>(
        `with heads as (
           select distinct on (h.subscription, h.key) h.seq, h.subscription, h.next_attempt_at,
             coalesce(h.message ->> 'tenant', (select l.tenant from ${s}.log l where l.position = h.position)) as tenant
           from ${s}.held h order by h.subscription, h.key, h.seq
         )
         update ${s}.held h set next_attempt_at = now() from heads
         where h.seq = heads.seq and heads.next_attempt_at is null and heads.tenant = $1
         returning heads.subscription`,
        [tenant],
      );
      await audit(tx, s, 'resume', tenant, options.actor ?? defaultActor(), { released: released.length });
      await tx.query('select pg_notify($1, $2)', [options.schema, '!tenants']);
      for (const subscription of new Set(released.map((row) => row.subscription))) {
        await tx.query('select pg_notify($1, $2)', [options.schema, `!held:${subscription}`]);
      }
      return { resumed: true, released: released.length };
    }),
  );
}

/**
 * Where a tenant's rows are, table by table, in the order a purge deletes them: what points into the log
 * (held messages, inbox records) before the log itself. Replicas' tables follow (`replicaRows`).
 */
const TENANT_ROWS: ReadonlyArray<readonly [table: string, where: (s: string) => string]> = [
  ['held', (s) => `coalesce(x.message ->> 'tenant', (select l.tenant from ${s}.log l where l.position = x.position)) = $1`],
  ['inbox', (s) => `x.message_id in (select l.id from ${s}.log l where l.tenant = $1)`],
  ['dead_letters', () => 'x.tenant = $1'],
  ['scheduled', () => 'x.tenant = $1'],
  ['sagas', () => 'x.tenant = $1'],
  ['saga_transitions', () => 'x.tenant = $1'],
  ['replies', () => 'x.tenant = $1'],
  ['log', () => 'x.tenant = $1'],
  ['tenants', () => 'x.tenant = $1'],
  ['tenant_quotas', () => 'x.tenant = $1'],
];

export interface PurgeResult {
  readonly tenant: string;
  readonly dryRun: boolean;
  /** Rows deleted (or that would be, on a dry run), per table. */
  readonly rows: Readonly<Record<string, number>>;
}

/**
 * Deletes every row Tidings keeps of a tenant, in one transaction, with an audit row of what it deleted;
 * `dryRun` counts them and deletes nothing (and writes no audit row). Suspend the tenant first, or messages
 * handled meanwhile may publish new ones. Other tenants' rows are untouched (test/tenants.pg.test.ts checks
 * table by table). Replicas' rows are counted per table, as `replica_<name>_g<n>`.
 */
export async function purgeTenant(db: SqlDriver, options: ActingOptions & { readonly dryRun?: boolean | undefined }): Promise<PurgeResult> {
  const s = schemaOf(options.schema);
  const tenant = checkTenant(options.tenant, 'tidings tenants purge');
  const dryRun = options.dryRun === true;
  return explainMissingSchema(options.schema, () =>
    db.transaction(async (tx) => {
      const rows: Record<string, number> = {};
      for (const [table, where] of TENANT_ROWS) {
        const sql = dryRun
          ? `select count(*)::int8 as n from ${s}.${table} x where ${where(s)}`
          : `with gone as (delete from ${s}.${table} x where ${where(s)} returning 1) select count(*)::int8 as n from gone`;
        const { rows: counted } = await tx.query<{ n: string | number }>(sql, [tenant]);
        rows[table] = Number(counted[0]?.n ?? 0);
      }
      Object.assign(rows, await replicaRows(tx, options.schema, tenant, dryRun));
      if (!dryRun) await audit(tx, s, 'purge', tenant, options.actor ?? defaultActor(), { rows });
      return { tenant, dryRun, rows };
    }),
  );
}

/**
 * A tenant's messages in the log, oldest first, as CloudEvents envelopes (one JSON line each for NDJSON),
 * read `chunkSize` at a time so an export of millions holds one chunk in memory. Writes an audit row first.
 */
export async function* exportTenant(db: Queryable, options: ActingOptions & { readonly chunkSize?: number | undefined }): AsyncGenerator<Envelope> {
  const s = schemaOf(options.schema);
  const tenant = checkTenant(options.tenant, 'tidings tenants export');
  const chunk = options.chunkSize ?? 1_000;
  if (!(Number.isSafeInteger(chunk) && chunk >= 1)) throw new TidingsError('INVALID_OPTIONS', `chunkSize must be a positive integer, got ${chunk}`);
  await explainMissingSchema(options.schema, () => audit(db, s, 'export', tenant, options.actor ?? defaultActor(), {}));
  let after = 0;
  for (;;) {
    const { rows } = await db.query<LogRow>(
      `select l.position::int8 as position, l.topic, l.id, l.type, l.source,
         to_char(l.time at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') as time, l.subject, l.key, l.key_hash,
         l.tenant, l.correlation_id, l.causation_id, l.traceparent, l.tracestate, l.data
       from ${s}.log l where l.tenant = $1 and l.position > $2 order by l.position limit $3`,
      [tenant, after, chunk],
    );
    for (const row of rows) yield toEnvelope(row);
    if (rows.length < chunk) return;
    after = Number(rows[rows.length - 1]!.position);
  }
}

/**
 * Deletes (or counts) the tenant's rows in every replica of the schema (src/replica): the generation readers
 * see, and the one a rebuild is filling. The replicas' meta rows are locked (for share) so that no rebuild
 * switches generations under the purge; a rebuild's pages written after the purge come from its source,
 * which an erasure purges too (docs/tenancy.md).
 */
async function replicaRows(tx: Queryable, schema: string, tenant: string, dryRun: boolean): Promise<Record<string, number>> {
  const rows: Record<string, number> = {};
  await eachReplicaTable(tx, schema, 'every', async ({ name, generation, tables }) => {
    const sql = dryRun ? tables.countTenant(generation) : tables.purge(generation);
    const { rows: counted } = await tx.query<{ n: string | number }>(sql, [tenant]);
    rows[`${replicaBase(name)}_g${generation}`] = Number(counted[0]?.n ?? 0);
  });
  return rows;
}

/** The tenant's rows in each replica's current generation, by replica name (`showTenant`). */
async function replicaCounts(db: Queryable, schema: string, tenant: string): Promise<Record<string, number>> {
  const counts: Record<string, number> = {};
  await eachReplicaTable(db, schema, 'current', async ({ name, generation, tables }) => {
    const { rows } = await db.query<{ n: string | number }>(tables.countTenant(generation), [tenant]);
    counts[name] = Number(rows[0]?.n ?? 0);
  });
  return counts;
}

/** Calls `fn` for each replica's generation table that exists: the current one, and with `'every'` the one a rebuild is filling. */
async function eachReplicaTable(
  db: Queryable,
  schema: string,
  generations: 'current' | 'every',
  fn: (table: { name: string; generation: number; tables: ReturnType<typeof generationStatements> }) => Promise<void>,
): Promise<void> {
  const meta = metaStatements(schema);
  const { rows: replicas } = await db.query<{ name: string; generation: number; building: number | null }>(meta.tables);
  for (const replica of replicas) {
    const tables = generationStatements(schema, replicaBase(replica.name), replica.name, meta.meta);
    for (const generation of generations === 'every' ? [replica.generation, replica.building] : [replica.generation]) {
      if (generation === null) continue;
      const { rows: exists } = await db.query<{ t: string | null }>('select to_regclass($1)::text as t', [tables.table(Number(generation))]);
      if (exists[0]?.t != null) await fn({ name: replica.name, generation: Number(generation), tables });
    }
  }
}

async function audit(db: Queryable, s: string, action: string, tenant: string, actor: string, detail: unknown): Promise<void> {
  await db.query(`insert into ${s}.tenant_actions (action, tenant, actor, detail) values ($1, $2, $3, $4::jsonb)`, [
    action,
    tenant,
    actor,
    JSON.stringify(detail),
  ]);
}
