/**
 * Per-tenant publish quotas (`tenancy.quotas`, docs/tenancy.md "Quotas"): a token bucket per tenant that
 * refills at the tenant's rate and holds at most its burst; each message published for the tenant takes a
 * token. Where the buckets live is the backbone's choice: PostgreSQL keeps one row per tenant, updated
 * atomically, so every process of the service draws on one budget (postgres/quotas.ts); a broker without an
 * outbox database keeps them in the process (`LocalTokenBuckets`). The policy (refuse or wait) is here.
 */
import { systemClock, type Clock } from './clock.ts';
import type { AnyContract } from './contract.ts';
import { TenantRateLimitedError, TidingsError } from './errors.ts';
import { sleep } from './sleep.ts';
import type { ResolvedQuotas, ResolvedRate } from './options.ts';

/** Where the tenants' buckets live. */
export interface TokenBuckets {
  /**
   * Takes `count` tokens of `tenant`'s bucket if it holds them: 0 then, else (nothing taken) the ms until it
   * will, at `rate`. A `count` over the burst is taken once the bucket is full, leaving it in debt, so a
   * large `publishMany` waits its turn instead of failing for ever. `tx`: the caller's transaction, for a
   * store that cannot work beside it (embedded PostgreSQL has one session).
   */
  take(tenant: string, rate: ResolvedRate, count: number, tx?: unknown): Promise<number>;
}

/** Buckets in this process: each process has its own budget (a broker without an outbox database). */
export class LocalTokenBuckets implements TokenBuckets {
  readonly #buckets = new Map<string, { tokens: number; at: number }>();

  constructor(private readonly now: () => number = () => Date.now()) {}

  async take(tenant: string, rate: ResolvedRate, count: number): Promise<number> {
    const now = this.now();
    const bucket = this.#buckets.get(tenant) ?? { tokens: rate.burst, at: now };
    const have = Math.min(rate.burst, bucket.tokens + (rate.ratePerSecond * Math.max(0, now - bucket.at)) / 1_000);
    const need = Math.min(count, rate.burst);
    const granted = have >= need;
    this.#buckets.set(tenant, { tokens: granted ? have - count : have, at: Math.max(now, bucket.at) });
    return granted ? 0 : Math.ceil(((need - have) * 1_000) / rate.ratePerSecond);
  }
}

/** A backbone's quotas: the options resolved, and the buckets they draw on. */
export class TenantQuotas {
  readonly #settings: ResolvedQuotas;
  readonly #closing = new AbortController();

  /** `clock`: what a wait for tokens waits on (the memory backbone's may be a test's virtual clock). */
  constructor(
    settings: ResolvedQuotas,
    private readonly buckets: TokenBuckets,
    private readonly clock: Clock = systemClock,
  ) {
    this.#settings = settings;
  }

  /** The tenant's rate, or undefined if it is not limited. */
  rateOf(tenant: string): ResolvedRate | undefined {
    return this.#settings.tenants.get(tenant) ?? this.#settings.default;
  }

  /**
   * Resolves once `count` messages of `contract` for `tenant` fit its quota (at once, or after waiting, by
   * `onLimit`); rejects with TENANT_RATE_LIMITED (a TenantRateLimitedError with `retryAfterMs`) otherwise.
   */
  async admit(tenant: string, contract: AnyContract, count: number, tx?: unknown): Promise<void> {
    const rate = this.rateOf(tenant);
    if (rate === undefined) return;
    const { onLimit, maxWaitMs } = this.#settings;
    const started = this.clock.now();
    for (;;) {
      const retryAfterMs = await this.buckets.take(tenant, rate, count, tx);
      if (retryAfterMs === 0) return;
      const waited = this.clock.now() - started;
      if (onLimit === 'reject' || waited + retryAfterMs > maxWaitMs) {
        const limited = { tenant, contract: contract.name, topic: contract.topic, count, retryAfterMs, ...rate };
        throw new TenantRateLimitedError(onLimit === 'reject' ? limited : { ...limited, waited: { ms: waited, maxWaitMs } });
      }
      await sleep(retryAfterMs, this.#closing.signal, this.clock);
      if (this.#closing.signal.aborted) {
        throw new TidingsError('STOPPED', `Cannot publish ${contract.name} for tenant ${tenant}: the backbone closed while it waited for its quota`, {
          ref: { topic: contract.topic },
        });
      }
    }
  }

  /** Ends the waits in progress: they reject with STOPPED. */
  close(): void {
    this.#closing.abort();
  }
}
