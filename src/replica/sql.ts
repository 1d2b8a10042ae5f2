import { checkIdentifier } from '../postgres/connection/identifiers.ts';
import { schemaOf } from '../postgres/sql/schema.ts';
import { bucketSql, identitySql, rowHashSql } from './digest.ts';

/**
 * Every SQL statement of replicas. `meta` statements work on the `replicas` table of a Tidings schema
 * (migration 006); `generation` statements on the tables of one replica, named after it. Identifiers are
 * validated; everything else is a parameter.
 */

/** The base name of a replica's tables and view (`replica_credentials_node_1`), within PostgreSQL's 63 characters. */
export function replicaBase(name: string): string {
  return checkIdentifier('replica table', `replica_${name.replace(/[.-]/g, '_')}`.slice(0, 52));
}

/**
 * What a source runs on its definition's `select` (the owner's query returning key, version and state, and
 * tenant when `tenants` is set), in the transaction of the request it answers: the digests of the buckets,
 * the rows of some buckets with their hashes, and the pages of a state transfer (in tenant and key order).
 */
export function sourceStatements(select: string, tenants: boolean) {
  const tenant = tenants ? `coalesce(s.tenant, '')` : `''::text`;
  const id = tenants ? identitySql(tenant, 's.key') : 's.key';
  return {
    digests: `select bucket, bit_xor(hash)::text as digest
             from (select ${bucketSql(id)} as bucket, ${rowHashSql(id, 's.version', 's.state')} as hash from (${select}) s) d
            group by bucket`,
    /** $1: the buckets (leaves of the digest tree). */
    keysOfLeaves: `select ${tenant} as tenant, s.key, s.version, s.state, ${rowHashSql(id, 's.version', 's.state')}::text as hash
             from (${select}) s where ${bucketSql(id)} = any($1::int[])`,
    /** $1, $2: the tenant and key of the previous page's last row ($2 null for the first page), $3: at most this many rows. */
    page: `select ${tenant} as tenant, s.key, s.version, s.state from (${select}) s
            where $2::text is null or (${tenant}, s.key) > ($1::text, $2::text) order by 1, s.key limit $3`,
    count: `select count(*)::int8 as n from (${select}) s`,
  };
}

/** What readers run on a replica's view (`view`: schema-qualified and quoted, see `replicaView`). */
export function viewStatements(view: string) {
  return {
    /** $1: the key, $2: its tenant (null: any tenant's; more than one row is then ambiguous). */
    get: `select tenant, state from ${view} where key = $1 and ($2::text is null or tenant = $2) limit 2`,
    /**
     * `where` and `orderBy`: the caller's SQL on the view's columns, its values as parameters (see
     * Replica.query); the tenant, if any, is the parameter after them (`tenantParam`).
     */
    query: (where: string, orderBy: string, limit: number | undefined, tenantParam: number | undefined) =>
      `select state from ${view} where (${where})${tenantParam === undefined ? '' : ` and tenant = $${tenantParam}`} order by ${orderBy}${limit === undefined ? '' : ` limit ${Math.max(0, Math.floor(limit))}`}`,
  };
}

/** The view readers query: `"schema"."replica_<name>"`. */
export function replicaView(schema: string, name: string): string {
  return `${schemaOf(schema)}."${replicaBase(name)}"`;
}

export function metaStatements(schema: string) {
  const meta = `${schemaOf(schema)}.replicas`;
  return {
    meta,
    exists: `select to_regclass('${meta}')::text as t`,
    /** Two processes preparing one replica at once would race on `create table if not exists`. */
    lock: `select pg_advisory_xact_lock(hashtext('tidings.replica'), hashtext($1))`,
    insert: `insert into ${meta} (name, source) values ($1, $2) on conflict (name) do nothing`,
    read: `select generation, building, filled_at from ${meta} where name = $1`,
    readForUpdate: `select generation, building, filled_at from ${meta} where name = $1 for update`,
    list: `select name, source, generation, building, checked_at, rebuilt_at, last_check from ${meta} where $1::text is null or name = $1 order by name`,
    names: `select name from ${meta} order by name`,
    /** Every replica's generations (the current one and the one being built), locked against a switch. */
    tables: `select name, generation, building from ${meta} order by name for share`,
    recordCheck: `update ${meta} set last_check = $2::jsonb, checked_at = now() where name = $1`,
    checkRecorded: `select last_check from ${meta} where name = $1 and last_check->>'checkId' = $2`,
    recordRebuild: `update ${meta} set rebuild = $2::jsonb where name = $1`,
    rebuildRecorded: `select rebuild from ${meta} where name = $1 and rebuild->>'rebuildId' = $2`,
    startBuilding: `update ${meta} set building = $2 where name = $1`,
    switchTo: `update ${meta} set generation = $2, building = null, filled_at = coalesce(filled_at, now()), rebuilt_at = now() where name = $1`,
    stopBuilding: `update ${meta} set building = null where name = $1 and building = $2`,
  };
}

export type MetaStatements = ReturnType<typeof metaStatements>;

/**
 * The statements of one replica's tables: `schema.base_g<n>`, its apply function, its view. A row is one
 * (key, tenant): the tenant of the event that wrote it, '' for none, so two tenants' rows of one key are two
 * rows. Row-level security confines a tenant's handlers to their tenant's rows, as on the log (migration 013).
 */
export function generationStatements(schema: string, base: string, name: string, meta: string) {
  const s = schemaOf(schema);
  const table = (generation: number) => `${s}."${base}_g${generation}"`;
  const applyFunction = (generation: number) => `${s}."${base}_apply_g${generation}"`;
  const id = identitySql('tenant', 'key');
  const literal = (text: string) => `'${text.replace(/'/g, "''")}'`;
  const bucket = `bucket int not null generated always as (${bucketSql(id)}) stored`;
  const hash = `hash int8 generated always as (case when state is null then null else ${rowHashSql(id, 'version', 'state')} end) stored`;
  const upsert = (target: string) => `insert into ${target} as t (tenant, key, version, state, event_time) values (tn, k, v, st, et)
        on conflict (key, tenant) do update set version = excluded.version, state = excluded.state, event_time = excluded.event_time, updated_at = now()
         where t.version < excluded.version`;
  /**
   * Grants every restricted role of tenant isolation (migration 013's `tenancy_roles`) what a feed handler
   * needs; and, the view reading with its reader's rights, every other role that may read the view the
   * generation's table too (else a reader granted the view would lose it at the next rebuild).
   */
  const grants = (generation: number) => `do $grant$ declare r text; begin
        for r in select role from ${s}.tenancy_roles loop
          execute format('grant select, insert, update, delete on %s to %I', ${literal(table(generation))}, r);
          execute format('grant select, insert, update, delete on %s to %I', ${literal(`${s}."${base}"`)}, r);
          execute format('grant select (name, generation, building, filled_at) on %s to %I', ${literal(meta)}, r);
        end loop;
        for r in select distinct case when a.grantee = 0 then 'public' else quote_ident(pg_get_userbyid(a.grantee)) end
                   from pg_class c, aclexplode(c.relacl) a
                  where c.oid = ${literal(`${s}."${base}"`)}::regclass and a.privilege_type = 'SELECT' and a.grantee <> c.relowner loop
          execute format('grant select on %s to %s', ${literal(table(generation))}, r);
        end loop;
      end $grant$`;
  return {
    table,
    create: (generation: number) => [
      `create table if not exists ${table(generation)} (
         key text not null,
         tenant text not null default '',
         version int8 not null,
         state jsonb,
         event_time timestamptz,
         updated_at timestamptz not null default now(),
         ${bucket},
         ${hash},
         primary key (key, tenant)
       )`,
      /*
       * A table made before replicas kept tenants (key alone as its primary key): add the tenant (every row
       * keeps '', no tenant), key rows by (key, tenant), and compute bucket and hash over both as above
       * (equal for rows of no tenant). Once, whoever comes first: the caller holds the replica's lock.
       */
      `do $tenant$ begin
        if not exists (select from pg_attribute where attrelid = ${literal(table(generation))}::regclass and attname = 'tenant' and not attisdropped) then
          alter table ${table(generation)} add column tenant text not null default '';
          execute format('alter table ${table(generation).replace(/'/g, "''")} drop constraint %I',
            (select conname from pg_constraint where conrelid = ${literal(table(generation))}::regclass and contype = 'p'));
          alter table ${table(generation)} add primary key (key, tenant);
          alter table ${table(generation)} drop column bucket, drop column hash;
          alter table ${table(generation)} add column ${bucket}, add column ${hash};
          drop function if exists ${applyFunction(generation)}(text, int8, jsonb, timestamptz, int);
        end if;
      end $tenant$`,
      `create index if not exists "${base}_g${generation}_bucket" on ${table(generation)} (bucket)`,
      `create index if not exists "${base}_g${generation}_event_time" on ${table(generation)} (event_time)`,
      `alter table ${table(generation)} enable row level security`,
      `drop policy if exists tenant_rows on ${table(generation)}`,
      `create policy tenant_rows on ${table(generation)} using ((select ${s}.tenancy_scope()) in ('all', 'any', 't:' || tenant))`,
      /*
       * One event's write as a function per generation, created with its table: it checks the meta row (the
       * generation readers see, and the one a rebuild fills) and writes the guarded upsert into that
       * generation, and into the one being built. One round trip per event, and PL/pgSQL keeps the plans of
       * its statements for the session instead of planning them for every event. It runs as its caller, so
       * row-level security holds inside it. Returns the rows written in this generation (0: the key is at
       * this version or newer), -1 if the meta row says otherwise than `building` (the caller rereads it),
       * -2 if there is no meta row.
       */
      `create or replace function ${applyFunction(generation)}(tn text, k text, v int8, st jsonb, et timestamptz, expected_building int) returns int
      language plpgsql as $apply$
      declare
        current_generation int;
        building_generation int;
        written int;
      begin
        select generation, building into current_generation, building_generation from ${meta} where name = ${literal(name)};
        if not found then return -2; end if;
        if current_generation <> ${generation} or building_generation is distinct from expected_building then return -1; end if;
        ${upsert(table(generation))};
        get diagnostics written = row_count;
        -- Planned only when reached: the next generation's table need not exist before.
        if building_generation = ${generation + 1} then
          ${upsert(table(generation + 1))};
        elsif building_generation is not null then
          execute format($sql$${upsert(`%I.%I`).replace('values (tn, k, v, st, et)', 'values ($1, $2, $3, $4, $5)')}$sql$, '${schema}', '${base}_g' || building_generation) using tn, k, v, st, et;
        end if;
        return written;
      end
      $apply$`,
    ],
    /** After the view exists: what a feed handler of a tenant-isolated bus needs (re-run at every start, for roles listed since). */
    grants,
    drop: (generation: number) => [`drop table if exists ${table(generation)}`, `drop function if exists ${applyFunction(generation)}`],
    /**
     * Readers query the view: switching it to another generation is one statement in the switch's
     * transaction. `security_invoker`: the table's row-level security confines the view's reader, not its
     * owner (whom it never confines); the owner's reads, the replica's own, cost no policy check at all.
     */
    point: (generation: number) =>
      `create or replace view ${s}."${base}" with (security_invoker = true) as
        select key, version, state, event_time, updated_at, tenant from ${table(generation)} where state is not null`,
    apply: (generation: number) => `select ${applyFunction(generation)}($1, $2, $3, $4::jsonb, $5, $6) as n`,
    /** The meta row and the key's current row (locked), in one statement. */
    readRow: (generation: number) => `select m.generation, m.building, r.version, r.state
           from ${meta} m
           left join lateral (select version, state from ${table(generation)} where key = $2 and tenant = $3 for update) r on true
          where m.name = $1`,
    all: (generation: number) => `select tenant, key, version, state, event_time from ${table(generation)}`,
    newest: (generation: number) => `select max(event_time) as at, now() as now from ${table(generation)}`,
    liveCount: (generation: number) => `select count(*) filter (where state is not null)::int8 as n from ${table(generation)}`,
    leafDigests: (generation: number) => `select bucket, bit_xor(hash)::text as digest from ${table(generation)} where hash is not null group by bucket`,
    keysOfLeaves: (generation: number) =>
      `select tenant, key, bucket, hash::text as hash from ${table(generation)} where bucket = any($1::int[]) and hash is not null order by bucket, tenant, key`,
    /** A repair writes the source's state over a row only if it is still as the check listed it ($5: its hash). */
    repairRow: (generation: number) => `insert into ${table(generation)} as t (tenant, key, version, state, event_time) values ($1, $2, $3, $4::jsonb, null)
           on conflict (key, tenant) do update set version = excluded.version, state = excluded.state, updated_at = now()
            where t.hash is not distinct from $5::int8`,
    /** A tombstone at the row's own version, if the row is still as listed: an older upsert in flight cannot bring it back. */
    repairAbsent: (generation: number) =>
      `update ${table(generation)} set state = null, updated_at = now() where tenant = $1 and key = $2 and hash = $3::int8 returning version`,
    /** A page of a state transfer, guarded like events: a live event already applied is newer than the page. */
    insertPage: (generation: number) => `insert into ${table(generation)} as t (tenant, key, version, state, event_time)
             select coalesce(r.tenant, ''), r.key, r.version, r.state, null from jsonb_to_recordset($1::jsonb) as r(tenant text, key text, version int8, state jsonb)
             on conflict (key, tenant) do update set version = excluded.version, state = excluded.state, updated_at = now()
              where t.version < excluded.version`,
    /** A purge of one tenant's rows (ops/tenants.ts); `count` for its dry run. */
    purge: (generation: number) => `with gone as (delete from ${table(generation)} where tenant = $1 returning 1) select count(*)::int8 as n from gone`,
    countTenant: (generation: number) => `select count(*)::int8 as n from ${table(generation)} where tenant = $1`,
  };
}

export type GenerationStatements = ReturnType<typeof generationStatements>;
