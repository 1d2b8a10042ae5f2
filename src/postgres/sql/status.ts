import { schemaOf } from './schema.ts';

/**
 * Lag of a cursor `c` of subscription `sub`: the log rows of its topics and partition whose transactions are
 * not in `done`, less those already handled in the window being worked through. Candidates come through the
 * xid index exactly as the consumer's read does (the transactions in progress at `done`, and newer ones), so
 * a caught-up subscription costs an index probe, not a scan of the log. `extra`: a further condition on `l`.
 * A subscription of every topic ('*': the outbox relay) counts every topic's rows (health.brokers.test.ts).
 * The rows of a tenant split off the partition's cursor (fair reads) are counted from the tenant's cursor.
 */
export function lagJoin(s: string, extra = 'true'): string {
  const rows = `(l.topic = any(sub.topics) or '*' = any(sub.topics)) and l.key_hash % sub.partitions = c.partition
        and ${extra}`;
  // A tenant split off the partition's cursor (fair reads, migration 016) is counted from its own cursor.
  return `cross join lateral (
      select sum(part.lag)::int8 as lag, min(part.oldest) as oldest from (
        select count(*)::int8 as lag, min(l.time) as oldest from ${s}.log l
        where (l.xid = any(array(select pg_snapshot_xip(c.done))) or l.xid >= pg_snapshot_xmax(c.done))
          and not pg_visible_in_snapshot(l.xid, c.done)
          and not (c.window_snapshot is not null and l.position <= c.window_position and pg_visible_in_snapshot(l.xid, c.window_snapshot))
          and not coalesce(c.tenants ? l.tenant, false)
          and ${rows}
        union all
        select count(l.position)::int8, min(l.time) from jsonb_each(coalesce(c.tenants, '{}'::jsonb)) as t(tenant, cursor)
        cross join lateral (
          select (t.cursor ->> 'done')::pg_snapshot as done, (t.cursor ->> 'window')::pg_snapshot as win, (t.cursor ->> 'position')::int8 as pos
        ) k
        join ${s}.log l on (l.xid = any(array(select pg_snapshot_xip(k.done))) or l.xid >= pg_snapshot_xmax(k.done))
          and not pg_visible_in_snapshot(l.xid, k.done)
          and not (k.win is not null and l.position <= k.pos and pg_visible_in_snapshot(l.xid, k.win))
          and l.tenant = t.tenant
          and ${rows}
      ) part
    ) lag`;
}

/** The statements of `readStatus`; $1 is a subscription's name, or null for all of them. */
export function statusStatements(schema: string) {
  const s = schemaOf(schema);
  return {
    now: 'select now() as at',
    subscriptions: `select name, topics, partitions from ${s}.subscriptions where $1::text is null or name = $1 order by name`,
    cursors: `select c.subscription, c.partition, c.owner, c.epoch::text as epoch, c.lease_expires_at,
            (extract(epoch from c.lease_expires_at - now()) * 1000)::float8 as lease_remaining_ms,
            c.handled::int8 as handled, lag.lag, (extract(epoch from now() - lag.oldest) * 1000)::float8 as oldest_ms, c.updated_at,
            array(select jsonb_object_keys(coalesce(c.tenants, '{}'::jsonb)) order by 1) as read_apart
          from ${s}.cursors c join ${s}.subscriptions sub on sub.name = c.subscription
          ${lagJoin(s)}
          where $1::text is null or c.subscription = $1
          order by c.subscription, c.partition`,
    workers: `select id, subscription, host, pid, started_at, expires_at, expires_at > now() as live, topics from ${s}.workers
          where $1::text is null or subscription = $1 order by subscription, started_at, id`,
    held: `select subscription, count(distinct key)::int8 as keys, count(*)::int8 as messages from ${s}.held
          where $1::text is null or subscription = $1 group by subscription`,
    deadLetters: `select subscription, count(*)::int8 as count from ${s}.dead_letters where $1::text is null or subscription = $1 group by subscription`,
  };
}
