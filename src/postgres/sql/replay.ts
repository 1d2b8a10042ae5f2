import { lagJoin } from './status.ts';
import { schemaOf } from './schema.ts';

/** The statements of a replay: $1 the subscription, $2 the position it is handled again from. */
export function replayStatements(schema: string) {
  const s = schemaOf(schema);
  return {
    lockSubscription: `select topics, partitions from ${s}.subscriptions where name = $1 for update`,
    lockCursors: `select partition from ${s}.cursors where subscription = $1 for update`,
    /** Messages before $2 not handled yet: moving the cursors skips them. */
    skipped: `select coalesce(sum(lag.lag), 0)::int8 as skipped from ${s}.cursors c join ${s}.subscriptions sub on sub.name = c.subscription
          ${lagJoin(s, 'l.position < $2')}
          where c.subscription = $1`,
    /**
     * Every cursor an open window just before $2, its epoch bumped and its owner cleared (see replaySubscription).
     * The floors (migration 017): exact for '1:1:'; unknown for the window (this transaction holds an xid).
     */
    moveCursors: `update ${s}.cursors set done = '1:1:'::pg_snapshot, window_snapshot = pg_current_snapshot(), window_position = $2, tenants = null,
            done_last = 0, done_next_xid = '1', window_last = null, window_next_xid = null,
            epoch = epoch + 1, owner = null, lease_expires_at = null, updated_at = now()
          where subscription = $1`,
    /** $3: the subscription's topics. */
    clearInbox: `delete from ${s}.inbox i using ${s}.log l
          where i.subscription = $1 and i.message_id = l.id and l.position >= $2 and l.topic = any($3::text[])`,
    /** $1 a position, $2 topics. */
    countFrom: `select count(*)::int8 as messages from ${s}.log where position >= $1 and topic = any($2::text[])`,
    /** $1 a time, $2 topics: the first position at or after it, or past the end of the log. */
    firstPositionAt: `select coalesce(
          (select min(position) from ${s}.log where time >= $1 and topic = any($2::text[])),
          (select coalesce(max(position), 0) + 1 from ${s}.log))::text as position`,
  };
}
