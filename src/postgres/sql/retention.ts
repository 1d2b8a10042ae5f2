import { schemaOf } from './schema.ts';

/** The statements of retention (retention.ts) for one schema; everything else is a parameter. */
export function retentionStatements(schema: string) {
  const s = schemaOf(schema);
  return {
    /**
     * One window of the log walk: the `$2` rows after position `$1`; deletes those older than their topic's
     * age ($3/$4 per-topic ages, $5 the default; null keeps forever) that every subscription has handled,
     * unless $6 (force). $7: dry run. $8: the youngest age of any policy, to tell when the walk can stop.
     */
    log: `with win as (
        select l.position, l.xid, l.topic, l.key_hash, l.tenant, l.time from ${s}.log l
        where l.position > $1::int8 order by l.position limit $2
      ), aged as (
        select w.*, case when o.topic is null then $5::float8 else o.ms end as max_age_ms
        from win w left join unnest($3::text[], $4::float8[]) as o(topic, ms) on o.topic = w.topic
      ), expired as (
        select a.position, a.xid, a.topic, a.key_hash, a.tenant from aged a
        where a.max_age_ms is not null and a.time < now() - make_interval(secs => a.max_age_ms / 1000.0)
      ), doomed as (
        select e.position from expired e
        where $6::boolean or (
          not exists (
            select 1 from ${s}.subscriptions sub
            join ${s}.cursors c on c.subscription = sub.name and c.partition = e.key_hash % sub.partitions
            cross join lateral (
              -- The cursor that reads e: its tenant's, if split off this partition's (migration 016), else the partition's.
              select coalesce((t.c ->> 'done')::pg_snapshot, c.done) as done,
                case when t.c is null then c.window_snapshot else (t.c ->> 'window')::pg_snapshot end as window_snapshot,
                case when t.c is null then c.window_position else (t.c ->> 'position')::int8 end as window_position
              from (select c.tenants -> e.tenant as c) t
            ) r
            where e.topic = any(sub.topics) and not pg_visible_in_snapshot(e.xid, r.done)
              and not (r.window_snapshot is not null and e.position <= r.window_position and pg_visible_in_snapshot(e.xid, r.window_snapshot)))
          and not exists (select 1 from ${s}.held h where h.position = e.position))
      ), deleted as (
        delete from ${s}.log l using doomed d where l.position = d.position and not $7::boolean returning 1
      )
      select (select count(*) from win)::int as examined,
        (select max(position) from win)::text as last,
        (select count(*) from expired)::int as expired,
        (select count(*) from doomed)::int as doomed,
        (select count(*) from deleted)::int as deleted,
        coalesce((select bool_or(w.time < now() - make_interval(secs => $8::float8 / 1000.0)) from win w), false) as old`,
    /** Inbox records past the de-duplication window. */
    inbox: sweep(s, 'inbox', 'handled_at', ['subscription', 'message_id']),
    deadLetters: sweep(s, 'dead_letters', 'dead_at', ['id']),
    /** Answers to requests nobody waits for any more. */
    replies: sweep(s, 'replies', 'created_at', ['request_id']),
    /** Takes the turn to prune if no one did for $2 ms; returns a row if this process ($1) got it. */
    claim: `insert into ${s}.retention (id, runner, last_run_at) values (true, $1, now())
      on conflict (id) do update set runner = excluded.runner, last_run_at = excluded.last_run_at
        where ${s}.retention.last_run_at <= now() - make_interval(secs => $2::float8 / 1000.0)
      returning runner`,
    vacuum: (table: 'log' | 'inbox' | 'dead_letters') => `vacuum (analyze) ${s}.${table}`,
  };
}

export type RetentionStatements = ReturnType<typeof retentionStatements>;

/**
 * Deleting a table's rows older than an age by their time column: `delete` takes $1 the age in ms and $2 the
 * batch size, and leaves rows locked by someone else (a redrive in progress) for the next run; `count` takes
 * $1 and counts what `delete` would remove, for a dry run. `key`: the table's primary key columns.
 */
function sweep(s: string, table: string, time: string, key: readonly string[]): { delete: string; count: string } {
  const old = `${time} < now() - make_interval(secs => $1::float8 / 1000.0)`;
  return {
    delete: `with doomed as (
        select ${key.join(', ')} from ${s}.${table} where ${old}
        order by ${time} limit $2 for update skip locked
      ), deleted as (
        delete from ${s}.${table} t using doomed d where ${key.map((column) => `t.${column} = d.${column}`).join(' and ')} returning 1
      )
      select count(*)::int as deleted from deleted`,
    count: `select count(*)::int as deleted from ${s}.${table} where ${old}`,
  };
}
