-- An acknowledgement whose partition lease was taken over raises this instead of answering "not fenced",
-- so a COMMIT sent with it in the same round trip rolls the batch's writes back instead of committing them.
create function {{schema}}.lease_lost() returns integer language plpgsql volatile as $$ begin raise exception 'the partition lease was lost; the batch is left to its new owner' using errcode = 'TDL01'; end $$;
