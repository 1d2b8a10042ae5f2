-- The first read of a window costs a batch, not the backlog (issue 24; consume/lanes.ts, statements.readLanes).
--
-- A statement writing the log takes its transaction id before it numbers a row: the identity default
-- (`position`) is evaluated before the `xid` default, so without this a transaction could number a row, then
-- take its xid after a reader's snapshot, and nothing in that snapshot would name it. With it, a transaction
-- that numbered a row before the log's last position was read held its xid then. A statement-level trigger:
-- once per INSERT or COPY, whatever its number of rows (and COPY keeps its batched inserts).
create function {{schema}}.xid_before_position() returns trigger language plpgsql as $$ begin perform pg_current_xact_id(); return null; end $$;
create trigger log_xid_before_position before insert on {{schema}}.log for each statement execute function {{schema}}.xid_before_position();

-- A snapshot's floor: `*_last` is the log's last position when it was taken and `*_next_xid` the next
-- transaction id to be assigned, read after that position. Every message it does not see numbered at most
-- `*_last` is then of a transaction that held an xid below `*_next_xid`: in the snapshot's in-progress list,
-- or from its xmax up. So a window opened from `done` starts its position range at `done_last`, or below it
-- at the lowest message of those few transactions, instead of sorting every message of the window.
-- Null (a cursor written by an older version, a replay, a subscription started "from now"): the window's
-- first read finds that lowest message among every transaction of the window, as before.
alter table {{schema}}.cursors add column done_last bigint, add column done_next_xid xid8, add column window_last bigint, add column window_next_xid xid8;
