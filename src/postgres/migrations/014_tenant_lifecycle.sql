-- Tenants' lifecycle (src/postgres/ops/tenants.ts, `tidings tenants`): which tenants are suspended (their
-- messages wait in `held`, the others flow), and every suspend, resume, purge and export, who ran it, when
-- and what it touched: an erasure request leaves its audit row.
create table {{schema}}.tenants (
  tenant text primary key,
  suspended_at timestamptz,
  suspended_by text,
  reason text
);
create table {{schema}}.tenant_actions (
  id bigint generated always as identity primary key,
  action text not null check (action in ('suspend', 'resume', 'purge', 'export')),
  tenant text not null,
  actor text not null,
  at timestamptz not null default now(),
  detail jsonb not null default '{}'
);
create index tenant_actions_tenant on {{schema}}.tenant_actions (tenant, id);
