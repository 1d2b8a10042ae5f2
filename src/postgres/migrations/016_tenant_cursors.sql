-- Fair delivery across a backlog (src/postgres/consume/lanes.ts, docs/tenancy.md "Fair delivery"): a
-- partition's cursor reads its tenants in commit order together, but a tenant that takes more than its
-- share of a read is split off and read on from its own cursor, while the partition's cursor goes on
-- without it. `tenants` holds those cursors, `{ "<tenant>": { "done", "window", "position" } }` (the
-- columns' meanings, per tenant); null or absent when none is split off. A tenant's messages are handled
-- by its own cursor if it has one, else by the partition's: retention and lag read it so too.
alter table {{schema}}.cursors add column tenants jsonb;
