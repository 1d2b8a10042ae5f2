-- Recurring schedules (bus.schedule): the last tick each one fired, claimed by one process in the same
-- transaction as the tick's message, so every tick publishes exactly once however many processes run it.
create table {{schema}}.schedules (
  name text primary key,
  definition text not null,
  last_tick timestamptz not null,
  fired_at timestamptz not null default now()
);
