-- Saga instances (core/saga.ts): one row per instance, its state and version, saved in the transaction of the
-- message that changed it; and each transition, with the message that caused it (tidings sagas show).
create table {{schema}}.sagas (
  saga text not null,
  id text not null,
  state jsonb not null,
  version integer not null,
  started_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  completed_at timestamptz,
  primary key (saga, id)
);
create index sagas_active on {{schema}}.sagas (saga, updated_at) where completed_at is null;
create table {{schema}}.saga_transitions (
  saga text not null,
  id text not null,
  version integer not null,
  message_id text not null,
  topic text not null,
  at timestamptz not null default now(),
  primary key (saga, id, version)
);
