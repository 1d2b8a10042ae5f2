-- The contracts registry (core/catalog.ts): each service writes what it publishes and the subscriptions it
-- runs when it starts, one row per service, replaced at each start; `tidings asyncapi --system` and
-- `tidings contracts check --against registry` read it with no code checked out.
create table {{schema}}.services (
  service text primary key,
  record jsonb not null,
  recorded_at timestamptz not null default now()
);
