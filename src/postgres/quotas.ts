/**
 * Tenants' token buckets in PostgreSQL (migration 015): one row per tenant, updated atomically by one
 * statement, so every process of the service draws on one budget per tenant (core/quotas.ts has the policy;
 * test/quotas.pg.test.ts counts what several processes get through).
 *
 * A take is a statement of its own on the pool, outside the caller's transaction: inside it, the tenant's row
 * would stay locked until the caller commits, and every other publisher of the tenant would wait for that.
 * So tokens taken for a publish whose transaction rolls back stay taken. Embedded PostgreSQL has one session,
 * where a statement beside an open transaction would wait for it: there the take joins the transaction.
 *
 * The takes of one tenant in one process go one at a time; the requests made meanwhile go together in the
 * next (the group commit of takes): one round trip and one commit per tenant per turn, however many
 * publishers there are. A take also asks for what the tenant's rate makes in LEASE_MS, if the bucket has it
 * to spare (at most LEASE_MAX): the publishes of the next few milliseconds then take those here, without a round trip. They are
 * taken from the shared bucket like any others (so no window lets more through than the bucket made), and
 * what is not used within LEASE_MS is dropped (this process's share of the budget for that moment, lost).
 */
import type { ResolvedRate } from '../core/options.ts';
import type { TokenBuckets } from '../core/quotas.ts';
import { preparing, runStatement, type Queryable, type Session, type SqlDriver } from './connection/driver.ts';
import { quotaStatements } from './sql/quotas.ts';

/** How long tokens taken ahead for a tenant's next publishes stay usable in the process. */
const LEASE_MS = 50;
/** The most tokens taken ahead at once (each is an element of the take's array). */
const LEASE_MAX = 100;

interface Request {
  readonly count: number;
  readonly resolve: (retryAfterMs: number) => void;
  readonly reject: (error: unknown) => void;
}

export class PostgresTokenBuckets implements TokenBuckets {
  readonly #sql: ReturnType<typeof quotaStatements>;
  readonly #names: { readonly take: string; readonly create: string };
  /** Per tenant with a take in flight: the requests made since, which go with the next. */
  readonly #waiting = new Map<string, Request[]>();
  /** Per tenant: tokens taken ahead (see LEASE_MS), and until when they may be used. */
  readonly #leases = new Map<string, { tokens: number; until: number }>();

  constructor(
    private readonly driver: () => SqlDriver,
    schema: string,
  ) {
    this.#sql = quotaStatements(schema);
    this.#names = { take: `tidings.${schema}.take_tokens`, create: `tidings.${schema}.create_bucket` };
  }

  take(tenant: string, rate: ResolvedRate, count: number, tx?: unknown): Promise<number> {
    const driver = this.driver();
    if (driver.embedded && tx !== undefined) return this.#take(tx as Queryable, tenant, rate, [count], 0).then(([retryAfterMs]) => retryAfterMs!);
    const lease = this.#leases.get(tenant);
    if (lease !== undefined && lease.tokens >= count && Date.now() < lease.until) {
      lease.tokens -= count;
      return Promise.resolve(0);
    }
    return new Promise((resolve, reject) => {
      const waiting = this.#waiting.get(tenant);
      if (waiting !== undefined) {
        waiting.push({ count, resolve, reject });
        return;
      }
      this.#waiting.set(tenant, []);
      void this.#turns(preparing(driver), tenant, rate, [{ count, resolve, reject }]);
    });
  }

  /** Takes for `requests`, then for those made meanwhile, until none are left. */
  async #turns(db: Session, tenant: string, rate: ResolvedRate, first: Request[]): Promise<void> {
    for (let requests = first; requests.length > 0; ) {
      try {
        const ahead = Math.min(LEASE_MAX, Math.floor((rate.ratePerSecond * LEASE_MS) / 1_000));
        const results = await this.#take(
          db,
          tenant,
          rate,
          requests.map((request) => request.count),
          ahead,
        );
        for (const [index, request] of requests.entries()) request.resolve(results[index]!);
      } catch (error) {
        for (const request of requests) request.reject(error);
      }
      requests = this.#waiting.get(tenant) ?? [];
      if (requests.length === 0) this.#waiting.delete(tenant);
      else this.#waiting.set(tenant, []);
    }
  }

  /**
   * One take: 0 for each request granted, else the ms until the tokens left would cover it. `ahead` tokens
   * more are asked for after them, one by one, each granted if the bucket still has it: the tenant's lease.
   */
  async #take(db: Session, tenant: string, rate: ResolvedRate, counts: readonly number[], ahead: number): Promise<number[]> {
    const asked = ahead === 0 ? counts : [...counts, ...Array.from({ length: ahead }, () => 1)];
    const take = { name: this.#names.take, text: this.#sql.take, params: [tenant, rate.ratePerSecond, rate.burst, asked] };
    let { rows } = await runStatement<{ granted: number; tokens: number }>(db, take);
    if (rows.length === 0) {
      await runStatement(db, { name: this.#names.create, text: this.#sql.create, params: [tenant, rate.burst] });
      ({ rows } = await runStatement<{ granted: number; tokens: number }>(db, take));
    }
    const granted = Number(rows[0]!.granted);
    const left = Number(rows[0]!.tokens);
    if (granted > counts.length) this.#leases.set(tenant, { tokens: granted - counts.length, until: Date.now() + LEASE_MS });
    return counts.map((count, index) => (index < granted ? 0 : Math.max(1, Math.ceil(((Math.min(count, rate.burst) - left) * 1_000) / rate.ratePerSecond))));
  }
}
