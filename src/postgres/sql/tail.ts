import { escapeLike, param, schemaOf } from './schema.ts';

export interface TailFilter {
  readonly topic: string;
  readonly key?: string | undefined;
  readonly type?: string | undefined;
  readonly tenant?: string | undefined;
  /** Case-insensitive text in the data's JSON. */
  readonly grep?: string | undefined;
}

/** The statements of `tailTopic`. */
export function tailStatements(schema: string) {
  const s = schemaOf(schema);
  return {
    snapshot: 'select pg_current_snapshot()::text as snapshot',
    /**
     * The filter's messages committed since the snapshot `done` and visible in the snapshot `window`, after
     * a position, in position order: a consumer's read without its cursor. The filter's values go to
     * `params`; the statement then takes, after them, `done`, `window`, the position and a limit.
     */
    read: (filter: TailFilter, params: unknown[]) => {
      const filters = [`l.topic = ${param(params, filter.topic)}`];
      if (filter.key !== undefined) filters.push(`l.key = ${param(params, filter.key)}`);
      if (filter.type !== undefined) filters.push(`l.type = ${param(params, filter.type)}`);
      if (filter.tenant !== undefined) filters.push(`l.tenant = ${param(params, filter.tenant)}`);
      if (filter.grep !== undefined) filters.push(`l.data::text ilike ${param(params, `%${escapeLike(filter.grep)}%`)}`);
      const [doneAt, windowAt, afterAt, limitAt] = [1, 2, 3, 4].map((n) => `$${params.length + n}`);
      return `select l.position::int8 as position, l.topic, l.id, l.type, l.source, l.time, l.subject, l.key, l.key_hash,
      l.tenant, l.correlation_id, l.causation_id, l.traceparent, l.tracestate, l.data
    from ${s}.log l
    where (l.xid = any(array(select pg_snapshot_xip(${doneAt}::pg_snapshot))) or l.xid >= pg_snapshot_xmax(${doneAt}::pg_snapshot))
      and pg_visible_in_snapshot(l.xid, ${windowAt}::pg_snapshot)
      and l.position > ${afterAt}
      and ${filters.join(' and ')}
    order by l.position limit ${limitAt}`;
    },
  };
}
