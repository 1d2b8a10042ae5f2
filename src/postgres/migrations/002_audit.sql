-- What operators did to dead letters: every redrive and drop, who ran it, when, and which messages.
-- A row is written in the same transaction as the change it records, so it exists iff the change does;
-- a large redrive runs in chunks and writes one row per chunk and subscription.
create table {{schema}}.dead_letter_actions (
  id bigint generated always as identity primary key,
  action text not null check (action in ('redrive', 'drop')),
  actor text not null,
  at timestamptz not null default now(),
  subscription text not null,
  message_ids text[] not null,
  count integer not null
);
create index dead_letter_actions_at on {{schema}}.dead_letter_actions (at);
