-- Retention (src/postgres/retention.ts) deletes inbox records and dead letters older than their windows,
-- oldest first, a small batch per statement: these indexes find them without scanning the tables.
-- (The log needs none: it is walked by its primary key, whose order follows commit time closely.)
create index inbox_handled_at on {{schema}}.inbox (handled_at);
create index dead_letters_dead_at on {{schema}}.dead_letters (dead_at);

-- When retention last ran and who ran it: of many processes, one prunes per interval.
create table {{schema}}.retention (
  id boolean primary key default true check (id),
  runner text,
  last_run_at timestamptz not null default '-infinity'
);
insert into {{schema}}.retention default values;
