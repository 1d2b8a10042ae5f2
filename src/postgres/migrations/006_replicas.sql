-- Replicas (src/replica): one row per replica in this schema, with its current generation (the table
-- readers see), the generation a rebuild is filling, and its last drift check and rebuild. The rows
-- themselves live in one table per generation, replica_<name>_g<n>, made when the generation starts
-- (store.ts). Versions before this one made this table themselves: it may exist already.
create table if not exists {{schema}}.replicas (
  name text primary key,
  source text not null,
  generation int not null default 1,
  building int,
  filled_at timestamptz,
  rebuilt_at timestamptz,
  checked_at timestamptz,
  last_check jsonb,
  rebuild jsonb
);
alter table {{schema}}.replicas add column if not exists rebuild jsonb;
