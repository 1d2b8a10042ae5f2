-- Tenancy (docs/tenancy.md): the tenant of every row that holds a tenant's data, so row-level security
-- (013) can confine a tenant's handlers to its rows and `tidings tenants purge` can find them all. The log
-- and scheduled messages carry it since 001 and 007. A dead letter's is its envelope's; a saga's, a
-- transition's and a reply's are the tenant whose handler wrote them (the setting 013 verifies), none
-- when written outside a tenant's handler.
-- The tenant a row written now belongs to: the tenant of the handler writing it (`tidings.scope` is
-- 't:<tenant>' there, see 013 and postgres/tenants.ts), else none.
create function {{schema}}.scope_tenant() returns text language sql stable as $$ select case when current_setting('tidings.scope', true) like 't:_%' then substr(current_setting('tidings.scope', true), 3) end $$;
alter table {{schema}}.dead_letters add column tenant text generated always as (envelope ->> 'tenant') stored;
alter table {{schema}}.sagas add column tenant text default {{schema}}.scope_tenant();
alter table {{schema}}.saga_transitions add column tenant text default {{schema}}.scope_tenant();
alter table {{schema}}.replies add column tenant text default {{schema}}.scope_tenant();
create index log_tenant on {{schema}}.log (tenant, position) where tenant is not null;
create index dead_letters_tenant on {{schema}}.dead_letters (tenant) where tenant is not null;
