-- Messages published for later (`deliverAt`, `delayMs`): a row here until it is due, when the scheduler's
-- leader moves it into the log, where it enters its key's order (scheduler.ts). `id` is unique: a publish
-- retried with the same id schedules one message, and `cancelScheduled(id)` finds it.
create table {{schema}}.scheduled (
  seq bigint generated always as identity primary key,
  id text not null unique,
  due_at timestamptz not null,
  topic text not null,
  type text not null,
  source text not null,
  time timestamptz not null,
  subject text,
  key text not null,
  key_hash integer not null check (key_hash >= 0),
  tenant text,
  correlation_id text not null,
  causation_id text,
  traceparent text,
  tracestate text,
  data jsonb not null,
  created_at timestamptz not null default now()
);
create index scheduled_due on {{schema}}.scheduled (due_at, seq);

-- Roles one process of many holds at a time (the scheduler's leader), by lease: whoever renews keeps it.
create table {{schema}}.leases (
  name text primary key,
  owner text not null,
  expires_at timestamptz not null
);
