-- The log: every published message, in one table. `xid` is the publishing transaction, so readers can
-- take messages in the order their transactions committed, by comparing snapshots (see consume/lanes.ts).
create table {{schema}}.log (
  position bigint generated always as identity primary key,
  xid xid8 not null default pg_current_xact_id(),
  topic text not null,
  id text not null,
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
  data jsonb not null
);
create index log_xid on {{schema}}.log (xid);

create table {{schema}}.subscriptions (
  name text primary key,
  topics text[] not null,
  partitions integer not null check (partitions > 0),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

-- One row per partition of a subscription: how far it has read, and who holds its lease.
-- `done`: every message whose transaction completed in this snapshot is handled.
-- `window_snapshot`/`window_position`: a larger snapshot being worked through, and the position reached in it.
create table {{schema}}.cursors (
  subscription text not null references {{schema}}.subscriptions (name) on delete cascade,
  partition integer not null,
  done pg_snapshot not null,
  window_snapshot pg_snapshot,
  window_position bigint,
  owner text,
  epoch bigint not null default 0,
  lease_expires_at timestamptz,
  handled bigint not null default 0,
  updated_at timestamptz not null default now(),
  primary key (subscription, partition)
);

create table {{schema}}.workers (
  id text primary key,
  subscription text not null references {{schema}}.subscriptions (name) on delete cascade,
  host text not null,
  pid integer not null,
  started_at timestamptz not null default now(),
  expires_at timestamptz not null
);
create index workers_subscription on {{schema}}.workers (subscription, expires_at);

-- Messages of keys that wait for a delayed retry. A key's first row (lowest seq) is its head and carries
-- the attempt count and the time of its next attempt; the rows after it wait their turn, in order.
create table {{schema}}.held (
  seq bigint generated always as identity primary key,
  subscription text not null,
  partition integer not null,
  key text not null,
  position bigint,
  message jsonb,
  attempts integer not null default 0,
  next_attempt_at timestamptz,
  history jsonb not null default '[]',
  held_at timestamptz not null default now()
);
create index held_due on {{schema}}.held (subscription, partition, next_attempt_at) where next_attempt_at is not null;
create index held_key on {{schema}}.held (subscription, key, seq);

create table {{schema}}.dead_letters (
  id bigint generated always as identity primary key,
  subscription text not null,
  message_id text not null,
  topic text not null,
  key text not null,
  position bigint,
  envelope jsonb not null,
  reason text not null,
  attempts jsonb not null,
  dead_at timestamptz not null default now()
);
create index dead_letters_subscription on {{schema}}.dead_letters (subscription, id);

-- Ids of handled messages per subscription, written in the acknowledgement's transaction.
create table {{schema}}.inbox (
  subscription text not null,
  message_id text not null,
  handled_at timestamptz not null default now(),
  primary key (subscription, message_id)
);
