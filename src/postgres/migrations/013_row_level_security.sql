-- Row-level security (docs/tenancy.md, postgres/tenants.ts). With `tenancy: { isolation: 'rls' }`, a
-- consumer's transactions run on connections logged in as a restricted role (listed in tenancy_roles);
-- every other role sees every row, as before. On those connections the setting `tidings.scope` says what
-- the statements running now may touch: 'all' (the consumer's own statements: read, acknowledge, hold),
-- 'any' (a cross-tenant subscription's handler: every tenant's rows, none of the consumer's tables) or
-- 't:<tenant>' (a handler of that tenant's message; 't:' for a message without one). Handler code can set
-- any setting it likes, so the scope counts only with `tidings.proof`, a keyed hash of the scope and the
-- transaction's id under a key the restricted role cannot read: a proof cannot be forged, nor reused by
-- another transaction. A scope that fails its proof is no scope: nothing is visible.
create table {{schema}}.tenancy_key (
  id boolean primary key default true check (id),
  secret bytea not null default decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
);
insert into {{schema}}.tenancy_key default values;
create table {{schema}}.tenancy_roles (
  role name primary key
);
revoke all on {{schema}}.tenancy_key, {{schema}}.tenancy_roles from public;
-- The scope in force: 'all' for any session not logged in as a restricted role, else the proven scope or null.
-- Security definer, so it reads the key the restricted role cannot; `session_user` is the login, which no
-- SET ROLE changes. Policies call it once per statement (`(select ...)`), not once per row.
create function {{schema}}.tenancy_scope() returns text language sql stable security definer set search_path = pg_catalog as $$ select case when not exists (select from {{schema}}.tenancy_roles r where r.role = session_user) then 'all' when current_setting('tidings.proof', true) = encode(sha256(k.secret || sha256(k.secret || convert_to(coalesce(current_setting('tidings.scope', true), '') || '/' || coalesce(pg_current_xact_id_if_assigned()::text, '-'), 'UTF8'))), 'hex') then current_setting('tidings.scope', true) end from {{schema}}.tenancy_key k $$;
-- Tenants' rows: a tenant's handlers see and write their tenant's, cross-tenant handlers and the consumer all.
alter table {{schema}}.log enable row level security;
create policy tenant_rows on {{schema}}.log using ((select {{schema}}.tenancy_scope()) in ('all', 'any', 't:' || coalesce(tenant, '')));
alter table {{schema}}.scheduled enable row level security;
create policy tenant_rows on {{schema}}.scheduled using ((select {{schema}}.tenancy_scope()) in ('all', 'any', 't:' || coalesce(tenant, '')));
alter table {{schema}}.sagas enable row level security;
create policy tenant_rows on {{schema}}.sagas using ((select {{schema}}.tenancy_scope()) in ('all', 'any', 't:' || coalesce(tenant, '')));
alter table {{schema}}.saga_transitions enable row level security;
create policy tenant_rows on {{schema}}.saga_transitions using ((select {{schema}}.tenancy_scope()) in ('all', 'any', 't:' || coalesce(tenant, '')));
alter table {{schema}}.replies enable row level security;
create policy tenant_rows on {{schema}}.replies using ((select {{schema}}.tenancy_scope()) in ('all', 'any', 't:' || coalesce(tenant, '')));
-- The consumer's own tables: no handler has business there, whatever its tenant.
alter table {{schema}}.dead_letters enable row level security;
create policy consumer_rows on {{schema}}.dead_letters using ((select {{schema}}.tenancy_scope()) = 'all');
alter table {{schema}}.held enable row level security;
create policy consumer_rows on {{schema}}.held using ((select {{schema}}.tenancy_scope()) = 'all');
alter table {{schema}}.inbox enable row level security;
create policy consumer_rows on {{schema}}.inbox using ((select {{schema}}.tenancy_scope()) = 'all');
alter table {{schema}}.cursors enable row level security;
create policy consumer_rows on {{schema}}.cursors using ((select {{schema}}.tenancy_scope()) = 'all');
alter table {{schema}}.subscriptions enable row level security;
create policy consumer_rows on {{schema}}.subscriptions using ((select {{schema}}.tenancy_scope()) = 'all');
alter table {{schema}}.workers enable row level security;
create policy consumer_rows on {{schema}}.workers using ((select {{schema}}.tenancy_scope()) = 'all');
