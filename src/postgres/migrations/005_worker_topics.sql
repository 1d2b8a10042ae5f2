-- What each worker handles, so the workers of a subscription can tell when they disagree (a rolling deploy
-- that adds or removes a handler): a worker never moves a cursor past messages of a topic the subscription
-- has and it cannot handle (consume/leases.ts). Null: a worker of a version before this one.
alter table {{schema}}.workers add column topics text[];
-- An acknowledgement whose worker lacks a topic the subscription gained raises this instead of moving its
-- cursors past that topic's messages, so a COMMIT sent with it rolls the batch back.
create function {{schema}}.topics_changed() returns integer language plpgsql volatile as $$ begin raise exception 'the subscription gained a topic this worker has no handler for; its partitions go to workers that have one' using errcode = 'TDL02'; end $$;
