/**
 * Every SQL statement the Postgres backbone runs, for one schema. The schema is a validated identifier;
 * everything else is a parameter.
 */
export function statements(schema: string) {
  const s = `"${schema}"`;
  const logColumns = `l.position::int8 as position, l.topic, l.id, l.type, l.source, l.time, l.subject, l.key, l.key_hash,
    l.tenant, l.correlation_id, l.causation_id, l.traceparent, l.tracestate, l.data`;
  const partitionFilter = `l.topic = any($2::text[]) and l.key_hash % $3 = $4`;

  return {
    /** $1: a JSON array of rows. One statement for any number of messages; order is kept by ordinality. */
    insertMessages: `insert into ${s}.log (topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data)
      select r.topic, r.id, r.type, r.source, r.time, r.subject, r.key, r.key_hash, r.tenant, r.correlation_id, r.causation_id, r.traceparent, r.tracestate, r.data
      from rows from (json_to_recordset($1::json) as (topic text, id text, type text, source text, time timestamptz, subject text, key text,
        key_hash integer, tenant text, correlation_id text, causation_id text, traceparent text, tracestate text, data jsonb))
        with ordinality as r(topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data, n)
      order by r.n`,

    /**
     * Opens a window: takes the current snapshot and returns the first messages of this partition whose
     * transactions completed after `done` ($1) and before that snapshot. Candidates are found through the
     * xid index: the transactions in progress at `done`, and those that began after it. So a long-running
     * unrelated transaction does not widen the scan. Returns one row with null columns when there is none.
     */
    openWindow: `select w.win::text as win, m.*
      from (select pg_current_snapshot() as win) w
      left join lateral (
        select ${logColumns} from ${s}.log l
        where (l.xid = any(array(select pg_snapshot_xip($1::pg_snapshot))) or l.xid >= pg_snapshot_xmax($1::pg_snapshot))
          and pg_visible_in_snapshot(l.xid, w.win)
          and ${partitionFilter}
        order by l.position
        limit $5
      ) m on true`,

    /** Continues a window ($6) after the position reached in it ($7), in position order through the primary key. */
    continueWindow: `select ${logColumns} from ${s}.log l
      where l.position > $7
        and pg_visible_in_snapshot(l.xid, $6::pg_snapshot) and not pg_visible_in_snapshot(l.xid, $1::pg_snapshot)
        and ${partitionFilter}
      order by l.position
      limit $5`,

    messagesAt: `select ${logColumns} from ${s}.log l where l.position = any($1::int8[])`,

    upsertSubscription: `insert into ${s}.subscriptions (name, topics, partitions) values ($1, $2, $3)
      on conflict (name) do update set topics = excluded.topics, updated_at = now()
        where ${s}.subscriptions.topics is distinct from excluded.topics
      returning partitions`,
    subscriptionPartitions: `select partitions from ${s}.subscriptions where name = $1`,
    /** $2: partition count; $3: start from the beginning of the log (true) or from now. */
    createCursors: `insert into ${s}.cursors (subscription, partition, done)
      select $1, p, case when $3::boolean then '1:1:'::pg_snapshot else pg_current_snapshot() end
      from generate_series(0, $2 - 1) p
      on conflict do nothing`,

    registerWorker: `insert into ${s}.workers (id, subscription, host, pid, expires_at) values ($1, $2, $3, $4, now() + make_interval(secs => $5 / 1000.0))
      on conflict (id) do update set expires_at = excluded.expires_at`,
    /** Renews this worker and its leases; returns how many workers are alive and which partitions it still holds. */
    heartbeat: `with me as (
        update ${s}.workers set expires_at = now() + make_interval(secs => $3 / 1000.0) where id = $1 returning id
      ), mine as (
        update ${s}.cursors set lease_expires_at = now() + make_interval(secs => $3 / 1000.0)
        where subscription = $2 and owner = $1 returning partition, epoch
      )
      select (select count(*)::int from ${s}.workers where subscription = $2 and (expires_at > now() or id in (select id from me))) as live,
        coalesce((select json_agg(json_build_object('partition', partition, 'epoch', epoch::text)) from mine), '[]'::json) as mine`,
    acquire: `update ${s}.cursors c set owner = $1, epoch = c.epoch + 1, lease_expires_at = now() + make_interval(secs => $3 / 1000.0)
      where (c.subscription, c.partition) in (
        select subscription, partition from ${s}.cursors
        where subscription = $2 and (owner is null or lease_expires_at < now())
        order by partition limit $4 for update skip locked)
      returning c.partition, c.epoch::text as epoch, c.done::text as done, c.window_snapshot::text as window_snapshot, c.window_position::int8 as window_position`,
    release: `update ${s}.cursors set owner = null, lease_expires_at = null where subscription = $1 and partition = $2 and owner = $3`,
    unregisterWorker: `delete from ${s}.workers where id = $1`,
    forgetExpiredWorkers: `delete from ${s}.workers where subscription = $1 and expires_at < now() - interval '1 hour'`,

    /** The acknowledgement: moves the cursor, fenced by the lease epoch so a worker that lost its lease cannot. */
    advanceCursor: `update ${s}.cursors set done = $4::pg_snapshot, window_snapshot = $5::pg_snapshot, window_position = $6,
        handled = handled + $7, updated_at = now()
      where subscription = $1 and partition = $2 and owner = $3 and epoch = $8`,

    inboxClaim: `insert into ${s}.inbox (subscription, message_id) select $1, unnest($2::text[])
      on conflict do nothing returning message_id`,
    inboxForget: `delete from ${s}.inbox where subscription = $1 and message_id = any($2::text[])`,

    /** $3: JSON array of {key, position, message, attempts, next_attempt_at, history}. */
    hold: `insert into ${s}.held (subscription, partition, key, position, message, attempts, next_attempt_at, history)
      select $1, $2, r.key, r.position, r.message, r.attempts, r.next_attempt_at, coalesce(r.history, '[]')
      from rows from (json_to_recordset($3::json) as (key text, position bigint, message jsonb, attempts integer,
        next_attempt_at timestamptz, history jsonb))
        with ordinality as r(key, position, message, attempts, next_attempt_at, history, n)
      order by r.n`,
    heldKeys: `select distinct key from ${s}.held where subscription = $1 and partition = $2`,
    dueHeads: `select seq::int8 as seq, key, position::int8 as position, message, attempts, history
      from ${s}.held where subscription = $1 and partition = $2 and next_attempt_at <= now()
      order by next_attempt_at limit $3`,
    nextDue: `select extract(epoch from min(next_attempt_at) - now()) * 1000 as ms
      from ${s}.held where subscription = $1 and partition = $2 and next_attempt_at is not null`,
    nextHeld: `select seq::int8 as seq, key, position::int8 as position, message, attempts, history
      from ${s}.held where subscription = $1 and key = $2 order by seq limit 1`,
    releaseHeld: `delete from ${s}.held where seq = $1`,
    rescheduleHeld: `update ${s}.held set attempts = $2, next_attempt_at = now() + make_interval(secs => $3 / 1000.0), history = $4::jsonb where seq = $1`,

    /** $1: JSON array of dead letters. */
    deadLetter: `insert into ${s}.dead_letters (subscription, message_id, topic, key, position, envelope, reason, attempts)
      select r.subscription, r.message_id, r.topic, r.key, r.position, r.envelope, r.reason, r.attempts
      from json_to_recordset($1::json) as r(subscription text, message_id text, topic text, key text, position bigint,
        envelope jsonb, reason text, attempts jsonb)`,
  };
}

export type Statements = ReturnType<typeof statements>;

/** A row of the log as the consumer reads it. */
export interface LogRow {
  position: number | string;
  topic: string;
  id: string;
  type: string;
  source: string;
  time: Date | string;
  subject: string | null;
  key: string;
  key_hash: number;
  tenant: string | null;
  correlation_id: string;
  causation_id: string | null;
  traceparent: string | null;
  tracestate: string | null;
  data: unknown;
}
