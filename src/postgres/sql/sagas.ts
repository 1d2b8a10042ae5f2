import { schemaOf } from './schema.ts';

/** The statements of `listSagas` and `showSaga`. */
export function sagaStatements(schema: string) {
  const s = schemaOf(schema);
  /** $1 a saga name or null, $2 'active', 'completed' or null. */
  const where = `($1::text is null or saga = $1) and ($2::text is null or ($2 = 'active') = (completed_at is null))`;
  return {
    /** $3: at most this many. */
    list: `select saga, id, version, completed_at is not null as completed, started_at, updated_at from ${s}.sagas where ${where} order by updated_at desc limit $3`,
    count: `select count(*)::int as n from ${s}.sagas where ${where}`,
    /** $1 saga, $2 id, for the three below. */
    show: `select saga, id, version, completed_at is not null as completed, started_at, updated_at, state from ${s}.sagas where saga = $1 and id = $2`,
    transitions: `select version, message_id, topic, at from ${s}.saga_transitions where saga = $1 and id = $2 order by version`,
    /** $1 the saga's timeout topic, $2 the instance id. */
    pendingTimeouts: `select data->>'name' as name, due_at, id from ${s}.scheduled where topic = $1 and data->>'id' = $2 order by due_at`,
  };
}
