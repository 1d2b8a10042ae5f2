/**
 * Every SQL statement the Postgres backbone runs, for one schema. The schema is a validated identifier;
 * everything else is a parameter.
 */
export function statements(schema: string) {
  const s = `"${schema}"`;
  // `time` as the envelope's ISO text: formatting it is cheaper for the server than parsing a timestamp
  // into a Date and back is for the consumer, whose one thread is what a drain waits on.
  const logColumns = `l.position::int8 as position, l.topic, l.id, l.type, l.source,
    to_char(l.time at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') as time, l.subject, l.key, l.key_hash,
    l.tenant, l.correlation_id, l.causation_id, l.traceparent, l.tracestate, l.data`;

  /**
   * The subscription's topics settled from its workers (CTEs ending in `settled`, the new topics if they
   * changed): every topic a live worker handles, and every topic the newest worker (the last started, alive
   * or not) handles. So a rolling deploy that adds a topic adds it when its first new worker starts, and keeps
   * it while that worker is down after a crash (old workers hold its partitions rather than skip its
   * messages); one that removes a topic removes it once no live worker handles it and the newest does not.
   * Workers of versions that did not record topics count for nothing. `me`: a worker counted as live.
   */
  const settle = (subscription: string, me: string) => `registered as (
        select topics, started_at, id, (expires_at > now() or id = ${me}) as live from ${s}.workers where subscription = ${subscription} and topics is not null
      ), wanted as (
        select array_agg(distinct t order by t) as topics from (
          select unnest(topics) as t from registered where live
          union all
          select unnest(topics) from (select topics from registered order by started_at desc, id desc limit 1) newest
        ) u
      ), settled as (
        update ${s}.subscriptions s set topics = w.topics, updated_at = now() from wanted w
        where s.name = ${subscription} and w.topics is not null and not (s.topics @> w.topics and s.topics <@ w.topics)
        returning s.topics
      )`;

  /**
   * Inserts the dead letters of a JSON array (the parameter `json`; rows as `deadRow` makes them). An envelope
   * sent without its data takes it from the log row at its position: the data is never sent back (and a
   * payload too deep for JSON.stringify cannot block the acknowledgement).
   */
  const insertDeadLetters = (json: string) => `insert into ${s}.dead_letters (subscription, message_id, topic, key, position, envelope, reason, attempts)
        select r.subscription, r.message_id, r.topic, r.key, r.position, r.envelope || case when r.position is not null and not r.envelope ? 'data' then jsonb_build_object('data', (select d.data from ${s}.log d where d.position = r.position)) else '{}'::jsonb end, r.reason, r.attempts
        from json_to_recordset(${json}::json) as r(subscription text, message_id text, topic text, key text, position bigint,
          envelope jsonb, reason text, attempts jsonb)`;

  return {
    schema,
    /** One message, its columns as parameters: cheaper than the JSON form for the most common publish. */
    insertMessage: `insert into ${s}.log (topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data)
      values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)`,
    /** The newest $1 committed messages, of topic $2 or of every topic when $2 is null, oldest first (tidings/testing). */
    newestMessages: `select * from (
        select position::int8 as position, topic, id, type, source, time, subject, key, key_hash, tenant,
          correlation_id, causation_id, traceparent, tracestate, data
        from ${s}.log where $2::text is null or topic = $2 order by position desc limit $1
      ) newest order by position`,
    /** Many messages streamed as COPY text (see `copyRows`): a third of the server's work per row of `insertMessages`. */
    copyMessages: `copy ${s}.log (topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data) from stdin`,
    /** $1: a JSON array of rows. One statement for any number of messages; order is kept by ordinality. */
    insertMessages: `insert into ${s}.log (topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data)
      select r.topic, r.id, r.type, r.source, r.time, r.subject, r.key, r.key_hash, r.tenant, r.correlation_id, r.causation_id, r.traceparent, r.tracestate, r.data
      from rows from (jsonb_to_recordset($1::jsonb) as (topic text, id text, type text, source text, time timestamptz, subject text, key text,
        key_hash integer, tenant text, correlation_id text, causation_id text, traceparent text, tracestate text, data jsonb))
        with ordinality as r(topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data, n)
      order by r.n`,

    /**
     * Reads every lane (partition) this worker holds, in one statement. Lanes at the same cursor are read
     * together, as a group, by one scan (they stay in step: the scan covers all of their partitions up to
     * the position it reached). $1-$4: per group, its partitions (as `{0,1}`), `done` snapshot, open
     * window (null: open one now, at the current snapshot) and position reached in it; $10-$11 `done`'s
     * floor (its `last` and `next_xid`, see migration 017; null: unknown).
     *
     * Opening a window returns the first messages of the group whose transactions completed after `done`
     * and by the current snapshot, scanning positions in order from the window's floor: `done_last`, or
     * one below the lowest message of the few transactions that held an xid when `done` was taken (in its
     * in-progress list, or from its xmax up to `done_next_xid`), found through the xid index. Every message
     * of the window is above it (017 says why), so the first read costs a batch, not the window: a window of
     * a million messages is not sorted to return its first hundred. With the floor unknown, those
     * transactions are all of the window's (as every read did before 017). They are found by xid alone, each
     * as a range of the xid index (one xid, or the xmax up to `done_next_xid`: its first xid assigned after
     * `done_last` was read, a harmless extra): a range the generic plan estimates as small whatever the
     * statistics say (an equality on a log written by few large transactions is estimated as most of it, and
     * planned as a scan). `+ 0` in `min(l.position + 0)` keeps the planner from answering the minimum by
     * walking the log in position order from its start (test/plans.pg.test.ts).
     * Opening also returns `hi`, the log's last position, then `next_xid`, the next transaction id (age()
     * reads it at its first call in a transaction that holds no xid: this statement's, once, `now` being
     * materialized; null in a transaction that holds one, where it would read that xid): no message of the
     * window is numbered above `hi`, and the pair is the floor of the window once it becomes `done`.
     * Continuing a window scans the positions after the one reached, a bounded range ($9: its span) at a
     * time, up to `hi`: bounded, each read costs the same however large the window. The position ranges
     * are bounded on both sides by values the plan cannot know, so even the generic plan PostgreSQL keeps
     * for this prepared statement walks the primary key from the floor and stops at the batch's last row
     * (test/plans.pg.test.ts). Each group returns one row with null message columns when it has nothing.
     * `seen`: the inbox has it.
     * `fair`: the variant of fair reads (tenantConcurrency, tenantWeights; see LaneReader): a group reads one
     * tenant, or leaves out some, and a tenant past its share of the read is cut short (it numbers the rows
     * of the whole range per tenant, so a fair window's first read is not bounded by a batch).
     */
    readLanes: (inbox: boolean, everyTopic: boolean, fair: boolean) => {
      // Every topic: $5 stays a parameter, so both variants take the same list.
      const topic = everyTopic ? 'and $5::text[] is not null ' : 'and l.topic = any($5::text[]) ';
      // `offset 0`: the lookup stays a probe of the inbox's key per row read. Without it PostgreSQL may answer
      // the `exists` by hashing every id of the subscription's inbox, a plan a read prepared on an empty inbox
      // keeps as the inbox grows (test/plans.pg.test.ts: 200,000 ids hashed at every read).
      const seen = inbox ? `exists (select 1 from ${s}.inbox i where i.subscription = $12 and i.message_id = l.id offset 0) as seen` : 'false as seen';
      const columns = `${logColumns}, l.key_hash % $6 as partition, ${seen}`;
      // Fair reads (lanes.ts, LaneReader): per group, the tenant it reads alone (`solo`, its share of rows),
      // or the tenants it leaves out (`skip`, a JSON array); a tenant's share of a read (`cap`). Rows are
      // numbered per tenant; one row past a tenant's share comes back (`beyond`) to say it has more.
      const f = inbox ? 13 : 12;
      const tenants = fair ? `, $${f}::text[], $${f + 1}::text[]` : '';
      const tenantColumns = fair ? ', solo, skip' : '';
      // A tenant's share of a read from the lane's cursor: $f + 2 times its weight ($f + 3, JSON; 1 if not
      // there), at least 1; a split-off tenant's cursor reads $f + 4 times its weight (lanes.ts, shareOf).
      const times = (rows: number, tenant: string) => `greatest(1, floor($${rows} * coalesce(($${f + 3}::jsonb ->> ${tenant})::float8, 1)))::int8`;
      const cap = (tenant: string) => times(f + 2, tenant);
      // A group that reads one tenant alone needs no numbering: its rows in order, up to its share, so a
      // window's first read stops after its share however many rows the window holds. One that numbers its
      // rows per tenant numbers every row of its range before its limit applies, so its first read of a
      // window spans at most 100 batches' positions from the floor (a window over a backlog of 1,000,000 would
      // cost seconds; one of 20,000 costs ~35 ms). Not less: the reads after it walk the rest in spans, a
      // read and a batch each, and a quiet tenant's message beyond a noisy backlog waited for them all.
      const firstEnd = fair ? 'case when c.solo is null then least(now.last, w.floor + greatest(c.span, $7 * 100)) else now.last end' : 'now.last';
      const scan = (where: string, order: string) =>
        fair
          ? `(select ${columns}, (f.rn > ${cap('f.tenant')} and f.tenant is not null) as beyond from (
              select l.position, l.tenant, row_number() over (partition by l.tenant order by l.position) as rn from ${s}.log l
              where c.solo is null and ${where}
                and not coalesce(c.skip::jsonb ? l.tenant, false)
            ) f join ${s}.log l on l.position = f.position
            where f.rn <= ${cap('f.tenant')} + 1 or f.tenant is null
            order by f.position
            limit $7)
            union all
            (select ${columns}, false as beyond from ${s}.log l
            where c.solo is not null and ${where} and l.tenant = c.solo
            order by ${order}
            limit ${times(f + 4, 'c.solo')})`
          : `select ${columns} from ${s}.log l
            where ${where}
            order by ${order}
            limit $7`;
      return `with groups as (
          select n, parts::int[] as parts, done, win, pos, hi, span, done_last, done_next_xid${tenantColumns}
          from unnest($1::text[], $2::text[], $3::text[], $4::int8[], $8::int8[], $9::int8[], $10::int8[], $11::text[]${tenants})
            with ordinality as c(parts, done, win, pos, hi, span, done_last, done_next_xid${tenantColumns}, n)
        ), now as materialized (
          select snap, last, case when pg_current_xact_id_if_assigned() is null
              then (pg_snapshot_xmax(snap)::text::int8 + age(pg_snapshot_xmax(snap)::xid))::text::xid8 end as next_xid
          from (select pg_current_snapshot() as snap, coalesce(pg_sequence_last_value('${s}.log_position_seq'::regclass), 0) as last offset 0) taken
        )
        select c.n as lane_group, now.snap::text as win, now.last as hi, now.next_xid::text as next_xid, ${firstEnd} as range_end, m.*
        from groups c cross join now
        cross join lateral (
          select least(f.last, (
              select min(lowest.position) - 1
              from (select x as lo, x as hi from pg_snapshot_xip(c.done::pg_snapshot) x
                union all select pg_snapshot_xmax(c.done::pg_snapshot), f.next_xid) r
              cross join lateral (select min(l.position + 0) as position from ${s}.log l where l.xid >= r.lo and l.xid <= r.hi) lowest)) as floor
          from (select case when c.done_next_xid is null then now.last else c.done_last end as last,
              coalesce(c.done_next_xid::xid8, pg_snapshot_xmax(now.snap)) as next_xid) f
        ) w
        left join lateral (
          ${scan(
            `l.position > w.floor and l.position <= ${firstEnd}
            and pg_visible_in_snapshot(l.xid, now.snap) and not pg_visible_in_snapshot(l.xid, c.done::pg_snapshot)
            ${topic}and l.key_hash % $6 = any(c.parts)`,
            'l.position',
          )}
        ) m on true
        where c.win is null
        union all
        select c.n, c.win, r.hi, null, r.range_end, m.*
        from groups c cross join now
        cross join lateral (
          select coalesce(c.hi, now.last) as hi, least(c.pos + c.span, coalesce(c.hi, now.last)) as range_end
        ) r
        left join lateral (
          ${scan(
            `l.position > c.pos and l.position <= r.range_end
            and pg_visible_in_snapshot(l.xid, c.win::pg_snapshot) and not pg_visible_in_snapshot(l.xid, c.done::pg_snapshot)
            ${topic}and l.key_hash % $6 = any(c.parts)`,
            'l.position',
          )}
        ) m on true
        where c.win is not null`;
    },

    /**
     * The acknowledgement of a batch, in one statement: moves the cursors of its lanes and records the inbox,
     * held messages and dead letters, only if this worker still holds every one of those lanes at the
     * epoch it read them with (the fence: a worker that lost a lease changes nothing). If a lease was lost it
     * writes nothing and raises SQLSTATE TDL01 (LEASE_LOST), so a COMMIT sent with it rolls the batch back.
     * If the subscription has a topic this worker does not handle (another worker that handles it registered
     * since: a rolling deploy), it writes nothing and raises TDL02 (TOPICS_CHANGED): its read skipped that
     * topic's messages, and its cursors must not move past them. (Messages of its window committed before its
     * read, so before that registration committed: they were not yet the subscription's.)
     * $1 subscription, $2 owner, $3-$8 per lane: partition, epoch, done, window, position, handled count,
     * $9 inbox ids, $10 held (JSON), $11 dead letters (JSON), $12 the topics this worker handles, $13 per
     * lane the cursors of the tenants split off it (JSON, see lanes.ts; null: none), $14-$17 per lane: the
     * floors of `done` and of the window (`last`, `next_xid`: see migration 017).
     *
     * `duplicates`: what an inbox id already recorded does. 'skip' (`on conflict do nothing`) for an
     * acknowledgement that commits with the handlers' writes, which cannot be sent again alone; 'fail' (a
     * plain insert: ~30 % less server time for the inbox rows, which speculative insertion costs a WAL
     * record each) for one that commits alone, whose sender repeats it with 'skip' on SQLSTATE 23505. An
     * id recorded in between the read and the acknowledgement (another worker handling a copy) is rare.
     */
    ack: (duplicates: 'skip' | 'fail') => `with lanes as (
        select * from unnest($3::int[], $4::int8[], $5::text[], $6::text[], $7::int8[], $8::int8[], $13::text[], $14::int8[], $15::text[], $16::int8[], $17::text[])
          as v(partition, epoch, done, win, pos, n, tenants, done_last, done_next_xid, win_last, win_next_xid)
      ), fenced as (
        select k.partition from ${s}.cursors k join lanes v on k.partition = v.partition
        where k.subscription = $1 and k.owner = $2 and k.epoch = v.epoch
        for update of k
      ), covered as (
        select coalesce((select s.topics <@ $12::text[] or '*' = any($12::text[]) from ${s}.subscriptions s where s.name = $1), true) as covered
      ), ok as (
        select covered and (select count(*) from fenced) = (select count(*) from lanes) as ok from covered
      ), moved as (
        update ${s}.cursors k set done = v.done::pg_snapshot, window_snapshot = v.win::pg_snapshot, window_position = v.pos,
          tenants = v.tenants::jsonb,
          done_last = v.done_last, done_next_xid = v.done_next_xid::xid8, window_last = v.win_last, window_next_xid = v.win_next_xid::xid8,
          handled = k.handled + v.n, updated_at = now()
        from lanes v, ok
        where ok.ok and k.subscription = $1 and k.partition = v.partition
        returning k.partition
      ), inboxed as (
        insert into ${s}.inbox (subscription, message_id) select $1, id from unnest($9::text[]) id, ok where ok.ok
        ${duplicates === 'skip' ? 'on conflict do nothing' : ''}
      ), held as (
        insert into ${s}.held (subscription, partition, key, position, message, attempts, next_attempt_at, history)
        select $1, r.partition, r.key, r.position, r.message, r.attempts, r.next_attempt_at, coalesce(r.history, '[]')
        from rows from (json_to_recordset($10::json) as (partition integer, key text, position bigint, message jsonb, attempts integer,
          next_attempt_at timestamptz, history jsonb)) with ordinality as r(partition, key, position, message, attempts, next_attempt_at, history, n), ok
        where ok.ok
        order by r.n
      ), dead as (
        ${insertDeadLetters('$11')}, ok
        where ok.ok
      )
      select case when not (select covered from covered) then ${s}.topics_changed()
        when (select count(*) from moved) = cardinality($3::int[]) then cardinality($3::int[]) else ${s}.lease_lost() end as fenced`,

    /** $1: a JSON array of rows with `due_at` (see `messagesJson`). A message scheduled again under its id is one message. */
    insertScheduled: `insert into ${s}.scheduled (id, due_at, topic, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data)
      select r.id, r.due_at, r.topic, r.type, r.source, r.time, r.subject, r.key, r.key_hash, r.tenant, r.correlation_id, r.causation_id, r.traceparent, r.tracestate, r.data
      from rows from (jsonb_to_recordset($1::jsonb) as (id text, due_at timestamptz, topic text, type text, source text, time timestamptz, subject text, key text,
        key_hash integer, tenant text, correlation_id text, causation_id text, traceparent text, tracestate text, data jsonb))
        with ordinality as r(id, due_at, topic, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data, n)
      order by r.n
      on conflict (id) do nothing`,
    cancelScheduled: `delete from ${s}.scheduled where id = $1 returning id`,
    /**
     * Records that schedule $1 (defined as $2) fired its tick $3, unless a tick as late was recorded already:
     * returns a row only to the one caller that claimed it. Concurrent claims of one tick wait on the row and
     * find it taken; a claim rolled back (a crash before the commit) leaves it to the next.
     */
    claimTick: `insert into ${s}.schedules (name, definition, last_tick) values ($1, $2, $3)
      on conflict (name) do update set definition = excluded.definition, last_tick = excluded.last_tick, fired_at = now()
        where ${s}.schedules.last_tick < excluded.last_tick
      returning 1 as claimed`,
    lastTick: `select definition, last_tick from ${s}.schedules where name = $1`,
    /** A saga instance, locked until the transaction ends (core/saga.ts). */
    loadSaga: `select state, version, completed_at is not null as completed from ${s}.sagas where saga = $1 and id = $2 for update`,
    findSaga: `select state, version, completed_at is not null as completed from ${s}.sagas where saga = $1 and id = $2`,
    /**
     * Saves a saga instance at version $4 if it is at $4 - 1 (0: not started), with the transition's cause
     * ($6 message id, $7 topic); returns a row only if it saved.
     */
    saveSaga: `with saved as (
        insert into ${s}.sagas as g (saga, id, state, version, completed_at) values ($1, $2, $3::jsonb, $4, case when $5::boolean then now() end)
        on conflict (saga, id) do update set state = excluded.state, version = excluded.version, completed_at = excluded.completed_at, updated_at = now()
          where g.version = excluded.version - 1
        returning 1
      ), logged as (
        insert into ${s}.saga_transitions (saga, id, version, message_id, topic) select $1, $2, $4, $6, $7 from saved
      )
      select count(*)::int as saved from saved`,
    /** The first answer to a request stands. */
    insertReply: `insert into ${s}.replies (request_id, data, error) values ($1, $2::jsonb, $3::jsonb) on conflict (request_id) do nothing`,
    takeReplies: `delete from ${s}.replies where request_id = any($1::text[]) returning request_id, data, error`,
    /**
     * Takes or renews a lease on a role ($1) for $2 for $3 ms; returns a row only to its holder. With it, how
     * long until the next scheduled message is due (null: none; negative: overdue).
     */
    leadScheduler: `insert into ${s}.leases (name, owner, expires_at) values ($1, $2, now() + make_interval(secs => $3 / 1000.0))
      on conflict (name) do update set owner = excluded.owner, expires_at = excluded.expires_at
        where ${s}.leases.owner = excluded.owner or ${s}.leases.expires_at < now()
      returning (select extract(epoch from min(due_at) - now()) * 1000 from ${s}.scheduled)::float8 as next_ms`,
    resignScheduler: `delete from ${s}.leases where name = $1 and owner = $2`,
    /**
     * Moves up to $3 due messages into the log, oldest due first, in one statement, if $2 still holds the
     * scheduler's lease ($1): two leaders, one of them late, could otherwise commit a key's due messages out
     * of order. Returns the topics moved to (to wake their consumers, as `{ topic: n }`) and how long until the
     * next message left is due (`next_ms`: null if none; zero or less if due already), so a leader moving a
     * steady stream needs no other statement between moves.
     */
    moveDue: `with leader as (
        select 1 from ${s}.leases where name = $1 and owner = $2 and expires_at > now()
      ), due as (
        delete from ${s}.scheduled where seq in (
          select seq from ${s}.scheduled where due_at <= now() and exists (select 1 from leader) order by due_at, seq limit $3 for update skip locked)
        returning *
      ), moved as (
        insert into ${s}.log (topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data)
        select topic, id, type, source, time, subject, key, key_hash, tenant, correlation_id, causation_id, traceparent, tracestate, data
        from due order by due_at, seq
        returning topic
      )
      select (select json_object_agg(topic, n) from (select topic, count(*)::int as n from moved group by topic) t) as topics,
        (select extract(epoch from s.due_at - now()) * 1000 from ${s}.scheduled s
          where not exists (select 1 from due d where d.seq = s.seq) order by s.due_at, s.seq limit 1)::float8 as next_ms`,

    /** Creates the subscription with its first worker's topics; its topics change only through `settleTopics`. */
    upsertSubscription: `insert into ${s}.subscriptions (name, topics, partitions) values ($1, $2, $3)
      on conflict (name) do nothing
      returning partitions`,
    subscriptionPartitions: `select partitions from ${s}.subscriptions where name = $1`,
    /**
     * Serialises the subscriptions that take command $1 (a lock held to the end of the transaction); then
     * `commandOwner` names another subscription ($2 is this one) that handles it already: a command has one owner.
     */
    commandLock: `select pg_advisory_xact_lock(hashtext('tidings.command'), hashtext($1))`,
    commandOwner: `select name from ${s}.subscriptions where name <> $2 and $1 = any(topics) limit 1`,
    /**
     * $2: partition count; $3: start from the beginning of the log (true) or from now. From the beginning,
     * every message is after `done`, numbered above 0: the floor is exact. From now, it is unknown (this
     * transaction holds an xid: age() would read that, not the next one), so the first window is read as a
     * whole; it holds only what was published since.
     */
    createCursors: `insert into ${s}.cursors (subscription, partition, done, done_last, done_next_xid)
      select $1, p, case when $3::boolean then '1:1:'::pg_snapshot else pg_current_snapshot() end,
        case when $3::boolean then 0 end, case when $3::boolean then '1'::xid8 end
      from generate_series(0, $2 - 1) p
      on conflict do nothing`,

    registerWorker: `insert into ${s}.workers (id, subscription, host, pid, expires_at, topics) values ($1, $2, $3, $4, now() + make_interval(secs => $5 / 1000.0), $6)
      on conflict (id) do update set expires_at = excluded.expires_at, topics = excluded.topics`,
    /** `settleTopics` alone: when a worker starts (after registering) or stops (after unregistering). $1 subscription. */
    settleTopics: `with ${settle('$1', 'null')} select topics from settled`,
    /**
     * Renews this worker and its leases; returns the live workers with what they handle, the subscription's
     * topics, and which partitions this worker still holds.
     */
    heartbeat: `with me as (
        update ${s}.workers set expires_at = now() + make_interval(secs => $3 / 1000.0) where id = $1 returning id
      ), mine as (
        update ${s}.cursors set lease_expires_at = now() + make_interval(secs => $3 / 1000.0)
        where subscription = $2 and owner = $1 returning partition, epoch
      ), ${settle('$2', '$1')}
      select coalesce((select json_agg(json_build_object('id', id, 'topics', topics) order by started_at)
          from ${s}.workers where subscription = $2 and (expires_at > now() or id = $1)), '[]'::json) as workers,
        coalesce((select topics from settled), (select topics from ${s}.subscriptions where name = $2)) as topics,
        coalesce((select json_agg(json_build_object('partition', partition, 'epoch', epoch::text)) from mine), '[]'::json) as mine`,
    acquire: `update ${s}.cursors c set owner = $1, epoch = c.epoch + 1, lease_expires_at = now() + make_interval(secs => $3 / 1000.0)
      where (c.subscription, c.partition) in (
        select subscription, partition from ${s}.cursors
        where subscription = $2 and (owner is null or lease_expires_at < now())
        order by partition limit $4 for update skip locked)
      returning c.partition, c.epoch::text as epoch, c.done::text as done, c.window_snapshot::text as window_snapshot, c.window_position::int8 as window_position,
        c.tenants, c.done_last::int8 as done_last, c.done_next_xid::text as done_next_xid, c.window_last::int8 as window_last, c.window_next_xid::text as window_next_xid`,
    release: `update ${s}.cursors set owner = null, lease_expires_at = null where subscription = $1 and partition = $2 and owner = $3`,
    unregisterWorker: `delete from ${s}.workers where id = $1`,
    /**
     * Is any worker registered other than $1 (this process's), or does another process lead the scheduler?
     * Expired workers count: they may be alive, only late.
     */
    othersConsume: `select exists (select 1 from ${s}.workers where id <> all($1::text[]))
      or exists (select 1 from ${s}.leases where owner <> all($1::text[]) and expires_at > now()) as others`,
    forgetExpiredWorkers: `delete from ${s}.workers where subscription = $1 and expires_at < now() - interval '1 hour'`,

    heldKeys: `select distinct key from ${s}.held where subscription = $1 and partition = any($2::int[])`,
    /**
     * The held messages a retry pass takes, in one statement: up to $3 keys whose head is due, and of each its
     * first $4 rows in key order (the head first), with the message from the log (null columns when it is
     * no longer there; a redriven one has its own `message`) and whether the inbox has it (`seen`).
     */
    dueHeld: `with heads as (
        select key, min(next_attempt_at) as due_at from (
          select key, next_attempt_at from ${s}.held where subscription = $1 and partition = any($2::int[]) and next_attempt_at <= now()
          order by next_attempt_at limit $3) due
        group by key
      )
      select h.seq::int8 as seq, h.key as held_key, h.position::int8 as held_position, h.message, h.attempts, h.history, ${logColumns},
        exists (select 1 from ${s}.inbox i where i.subscription = $1 and i.message_id = coalesce(l.id, h.message ->> 'id')) as seen
      from heads cross join lateral (
        select seq, key, position, message, attempts, history from ${s}.held
        where subscription = $1 and key = heads.key order by seq limit $4
      ) h
      left join ${s}.log l on l.position = h.position
      order by heads.due_at, h.key, h.seq`,
    /**
     * What a retry pass did, in one statement: $2 the held rows it released (handled or dead-lettered), $3 the
     * rows whose retry it set (JSON `{ seq, attempts, delay_ms, history }`; null fields stay, a null delay
     * waits with no time), $4 ids for subscription $1's inbox, $5 dead letters (see `insertDeadLetters`).
     */
    settleHeld: `with released as (
        delete from ${s}.held where seq = any($2::int8[])
      ), retried as (
        update ${s}.held h set attempts = coalesce(r.attempts, h.attempts), history = coalesce(r.history, h.history),
          next_attempt_at = now() + make_interval(secs => r.delay_ms / 1000.0)
        from json_to_recordset($3::json) as r(seq bigint, attempts integer, delay_ms float8, history jsonb)
        where h.seq = r.seq
      ), inboxed as (
        insert into ${s}.inbox (subscription, message_id) select $1, unnest($4::text[]) on conflict do nothing
      ), dead as (
        ${insertDeadLetters('$5')}
      )
      select 1`,
    nextDue: `select extract(epoch from min(next_attempt_at) - now()) * 1000 as ms
      from ${s}.held where subscription = $1 and partition = any($2::int[]) and next_attempt_at is not null`,
    /** Holds the lanes' rows and checks this worker still owns them: the fence of a retry pass. */
    fence: `select count(*)::int as fenced from (
        select 1 from ${s}.cursors k
        join unnest($3::int[], $4::int8[]) as v(partition, epoch) on k.partition = v.partition
        where k.subscription = $1 and k.owner = $2 and k.epoch = v.epoch
        for update of k) f`,

    inboxClaim: `insert into ${s}.inbox (subscription, message_id) values ($1, $2) on conflict do nothing returning message_id`,
    /** Which of $2's ids subscription $1 has handled. */
    inboxSeen: `select message_id from ${s}.inbox where subscription = $1 and message_id = any($2::text[])`,
    inboxRecord: `insert into ${s}.inbox (subscription, message_id) select $1, unnest($2::text[]) on conflict do nothing`,
  };
}

export type Statements = ReturnType<typeof statements>;
