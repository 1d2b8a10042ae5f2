import { schemaOf } from './schema.ts';

/** The statements on a schema's subscriptions as a whole: naming them, and dropping one ($1). */
export function subscriptionStatements(schema: string) {
  const s = schemaOf(schema);
  return {
    names: `select name from ${s}.subscriptions order by name`,
    lock: `select name from ${s}.subscriptions where name = $1 for update`,
    liveWorkers: `select id from ${s}.workers where subscription = $1 and expires_at > now()`,
    deleteHeld: `delete from ${s}.held where subscription = $1`,
    deleteInbox: `delete from ${s}.inbox where subscription = $1`,
    delete: `delete from ${s}.subscriptions where name = $1`,
  };
}
