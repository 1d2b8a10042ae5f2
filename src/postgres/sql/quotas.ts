import { schemaOf } from './schema.ts';

/** The statements of the tenants' token buckets (postgres/quotas.ts, migration 015). */
export function quotaStatements(schema: string) {
  const s = schemaOf(schema);
  /** A request fits while the requests up to it fit in the bucket; a first request over the burst needs a full bucket, and leaves a debt. */
  const fits = '(r.wanted <= b.have or (r.i = 1 and b.have >= $3::float8))';
  return {
    /**
     * Takes tokens for requests of a tenant, in their order, while they fit: $1 the tenant, $2 its rate
     * (tokens per second), $3 its burst, $4 the tokens each request wants (an array: requests made while the
     * last take was in flight go together). First the bucket refills for the time since the last take, by the
     * database's clock (the processes' clocks do not matter; never backwards, should a take that waited for the
     * row lock have started before the last one). Returns how many requests were granted, and the tokens left.
     * No row: `create` it first.
     */
    take: `update ${s}.tenant_quotas q set (tokens, granted, refilled_at) = (
      select b.have - coalesce(max(r.wanted) filter (where ${fits}), 0), count(*) filter (where ${fits}), b.at
      from (select least($3::float8, q.tokens + $2::float8 * extract(epoch from greatest(statement_timestamp(), q.refilled_at) - q.refilled_at)) as have,
                   greatest(statement_timestamp(), q.refilled_at) as at) b
      cross join (select u.i, sum(u.tokens) over (order by u.i) as wanted from unnest($4::int4[]) with ordinality u(tokens, i)) r
      group by b.have, b.at)
    where q.tenant = $1
    returning q.granted, q.tokens`,
    /** A full bucket for a tenant's first take (or its first since a purge). */
    create: `insert into ${s}.tenant_quotas (tenant, tokens, refilled_at) values ($1, $2, statement_timestamp()) on conflict (tenant) do nothing`,
  };
}
