import { requireSelection, type DeadLetterSelection } from '../../core/dead-letters.ts';
import { escapeLike, param, schemaOf } from './schema.ts';

/** Matches the ids and numbers of error texts, so that `group` puts messages that differ only by them together. */
const UUID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
const DIGITS = '[0-9]+';

/**
 * The WHERE clause of a selection over `dead_letters d`; values go to `params`, never into the text. With
 * `requireFilter`, a selection that names nothing is refused unless it says `all: true`.
 */
export function selectionSql(selection: DeadLetterSelection, params: unknown[], rules: { requireFilter: boolean }): string {
  const clauses: string[] = [];
  const ids = selection.ids ?? [];
  if (ids.length > 0) {
    const numeric = ids.filter((id) => /^\d{1,18}$/.test(id));
    clauses.push(`(d.id = any(${param(params, numeric)}::int8[]) or d.message_id = any(${param(params, [...ids])}::text[]))`);
  }
  if (selection.subscription !== undefined) clauses.push(`d.subscription = ${param(params, selection.subscription)}`);
  if (selection.topic !== undefined) clauses.push(`d.topic = ${param(params, selection.topic)}`);
  if (selection.errorText !== undefined) {
    const pattern = param(params, `%${escapeLike(selection.errorText)}%`);
    clauses.push(`(d.reason ilike ${pattern} or exists (select 1 from jsonb_array_elements(d.attempts) a where a -> 'error' ->> 'message' ilike ${pattern}))`);
  }
  if (rules.requireFilter) requireSelection(selection);
  return clauses.length === 0 ? 'true' : clauses.join(' and ');
}

/**
 * The statements on dead letters. Those taking `where` (from `selectionSql`) and `params` append their own
 * parameters to `params`, after the selection's.
 */
export function deadLetterStatements(schema: string) {
  const s = schemaOf(schema);
  const summary = `d.id::text as id, d.subscription, d.message_id, d.topic, d.key, d.position::int8 as position, d.reason,
            jsonb_array_length(d.attempts) as attempts`;
  return {
    count: (where: string) => `select count(*)::int8 as total from ${s}.dead_letters d where ${where}`,
    list: (where: string, params: unknown[], limit: number) =>
      `select ${summary}, d.dead_at
          from ${s}.dead_letters d where ${where} order by d.id limit ${param(params, limit)}`,
    /** Grouped by subscription and the reason with its ids and numbers masked, largest group first. */
    group: (where: string, params: unknown[], limit: number) => {
      const uuid = param(params, UUID);
      const digits = param(params, DIGITS);
      return `select d.subscription, regexp_replace(regexp_replace(d.reason, ${uuid}, '<id>', 'gi'), ${digits}, 'N', 'g') as pattern,
          min(d.reason) as example, count(*)::int8 as count, array_agg(distinct d.topic) as topics,
          min(d.dead_at) as first_at, max(d.dead_at) as last_at
        from ${s}.dead_letters d where ${where}
        group by 1, 2 order by count(*) desc, 1, 2 limit ${param(params, limit)}`;
    },
    show: (where: string) => `select ${summary}, d.attempts as attempts_list, d.envelope, d.dead_at
        from ${s}.dead_letters d where ${where} order by d.id`,
    /** The newest id and the count of a selection: a chunked action does only what exists when it starts. */
    head: (where: string) => `select max(d.id)::text as max, count(*)::int8 as total from ${s}.dead_letters d where ${where}`,
    /** The next chunk of a selection, up to the id `head` found, locked for the chunk's transaction. */
    chunk: (where: string, params: unknown[], maxId: string, limit: number) =>
      `select d.id::text as id, d.subscription, d.message_id, d.key from ${s}.dead_letters d
          where ${where} and d.id <= ${param(params, maxId)}::int8 order by d.id limit ${param(params, limit)} for update`,
    /** $1: ids. */
    delete: `delete from ${s}.dead_letters where id = any($1::int8[])`,
    /** $1 action, $2 actor, $3 subscription, $4 message ids, $5 count. */
    audit: `insert into ${s}.dead_letter_actions (action, actor, subscription, message_ids, count) values ($1, $2, $3, $4, $5)`,
    /** The partition count of each subscription of a selection; null for a subscription that is gone. */
    redriveTargets: (where: string) => `select d.subscription, max(sub.partitions) as partitions
      from ${s}.dead_letters d left join ${s}.subscriptions sub on sub.name = d.subscription
      where ${where} group by d.subscription`,
    /** See redriveDeadLetters for why a redrive locks `held`. */
    lockHeld: `lock table ${s}.held in share row exclusive mode`,
    /**
     * $1: JSON rows `{ id, partition, first }`. The envelope goes from dead_letters to held inside the
     * database; ordinality keeps the order. A key's first row is due at once unless the key already waits.
     */
    redrive: `insert into ${s}.held (subscription, partition, key, position, message, attempts, next_attempt_at, history)
            select d.subscription, r.partition, d.key, d.position, d.envelope, 0,
              case when r.first and not exists (select 1 from ${s}.held h where h.subscription = d.subscription and h.key = d.key) then now() end,
              '[]'::jsonb
            from rows from (json_to_recordset($1::json) as (id bigint, partition integer, first boolean)) with ordinality as r(id, partition, first, n)
            join ${s}.dead_letters d on d.id = r.id
            order by r.n`,
    /** $1 the channel (the schema), $2 `!held:<subscription>`: running workers reload their held keys. */
    notify: 'select pg_notify($1, $2)',
  };
}

export type DeadLetterStatements = ReturnType<typeof deadLetterStatements>;
