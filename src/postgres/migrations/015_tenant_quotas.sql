-- Tenants' publish quotas (src/postgres/quotas.ts, docs/tenancy.md "Quotas"): one token bucket per tenant,
-- shared by every process of the service. A take updates the tenant's row in one statement, so concurrent
-- takes queue on its row lock and each sees the tokens the last one left. `granted` is the last take's
-- outcome, the number of its requests granted: what the take statement returns (an UPDATE's RETURNING sees
-- only the new row). Unlogged: a take's commit then waits for no WAL flush (a publish would otherwise pay a
-- second fsync), and a crash, which empties the table, only gives every tenant a full bucket again.
create unlogged table {{schema}}.tenant_quotas (
  tenant text primary key,
  tokens double precision not null,
  refilled_at timestamptz not null,
  granted integer not null default 0
);
