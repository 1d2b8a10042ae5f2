import { TidingsError } from './errors.ts';
import { tenantProblem } from './tenant.ts';

/** How a subscription retries a failing handler before the message goes to dead letters. */
export interface RetryOptions {
  /** Attempts made again at once after a failure, before delayed retries begin. */
  immediate?: number;
  /** Delays (ms) before each delayed retry; the message's key is held meanwhile. */
  delayed?: readonly number[];
  /** Random spread applied to each delay, as a fraction (0.1 = ±10 %), so retries do not stampede. */
  jitter?: number;
}

export interface SubscribeOptions {
  /** Handlers in flight at once per subscription in this process; messages of one key never run concurrently. */
  concurrency?: number;
  /** Ordered lanes the subscription's keys hash into; workers in several processes share them by lease. */
  partitions?: number;
  /** Messages read per partition per batch (one read and one acknowledgement per batch). */
  batchSize?: number;
  retry?: RetryOptions;
  /** A handler running longer than this is abandoned and the attempt counts as failed. 0 disables. */
  timeoutMs?: number;
  /** De-duplicate by message id, in the acknowledgement's transaction. */
  inbox?: boolean;
  /** Where a subscription that does not exist yet starts: messages committed from now on, or all of the log. */
  startFrom?: 'now' | 'beginning';
  /** A message without a tenant is dead-lettered with the reason instead of handled (core/tenant.ts). */
  requireTenant?: boolean;
  /** Its handlers may publish for tenants other than their message's (a fan-out, an operator's job). */
  crossTenant?: boolean;
  /**
   * Keys of one tenant in flight at once within a batch (times its weight), so a tenant whose keys fill a
   * batch leaves slots to the others; undefined: no cap. PostgreSQL and memory (docs/tenancy.md, "Fair delivery").
   */
  tenantConcurrency?: number;
  /** Tenants' shares of a batch's slots relative to each other (default 1 each): `{ acme: 3 }`. PostgreSQL and memory. */
  tenantWeights?: Record<string, number>;
}

export const subscriptionDefaults = {
  concurrency: 8,
  partitions: 4,
  batchSize: 500,
  retry: { immediate: 2, delayed: [1_000, 10_000, 60_000], jitter: 0.1 },
  timeoutMs: 30_000,
  inbox: true,
  startFrom: 'now',
  requireTenant: false,
  crossTenant: false,
  tenantConcurrency: undefined,
  tenantWeights: {},
} as const satisfies Omit<Required<SubscribeOptions>, 'tenantConcurrency'> & Pick<SubscribeOptions, 'tenantConcurrency'>;

export interface ResolvedRetry {
  readonly immediate: number;
  readonly delayed: readonly number[];
  readonly jitter: number;
}

export interface ResolvedSubscribeOptions {
  readonly concurrency: number;
  readonly partitions: number;
  readonly batchSize: number;
  readonly retry: ResolvedRetry;
  readonly timeoutMs: number;
  readonly inbox: boolean;
  readonly startFrom: 'now' | 'beginning';
  readonly requireTenant: boolean;
  readonly crossTenant: boolean;
  readonly tenantConcurrency: number | undefined;
  readonly tenantWeights: Readonly<Record<string, number>>;
}

export const busDefaults = {
  /** Largest `data` accepted at publish, in bytes of JSON. */
  maxPayloadBytes: 256 * 1024,
  /** How long `bus.request` waits for its reply. */
  requestTimeoutMs: 30_000,
  /** Whether every message must carry a tenant. */
  requireTenant: false,
  /**
   * How long `bus.stop()` lets in-flight handlers finish before it aborts their `ctx.signal`: under the 30 s
   * Kubernetes gives a pod between SIGTERM and SIGKILL, with room for the acknowledgements and the close.
   */
  stopGraceMs: 10_000,
} as const;

/** A tenant's publish rate: a token bucket that refills `ratePerSecond` and holds at most `burst` (docs/tenancy.md, "Quotas"). */
export interface TenantRate {
  /** Messages per second the tenant may publish, on average. */
  ratePerSecond: number;
  /** Messages it may publish at once after a quiet spell (the bucket's size); default: one second's worth. */
  burst?: number;
}

/** Per-tenant publish quotas, shared by the service's processes where the backbone has a database. */
export interface QuotaOptions {
  /** The rate of every tenant not named in `tenants`; none: those tenants are not limited. */
  default?: TenantRate;
  /** Rates of named tenants, over `default`: `{ acme: { ratePerSecond: 500 } }`. */
  tenants?: Record<string, TenantRate>;
  /** Over its quota, a publish fails with TENANT_RATE_LIMITED (`'reject'`), or waits for its tokens (`'wait'`). */
  onLimit?: 'reject' | 'wait';
  /** With `'wait'`: a publish that would wait longer than this fails with TENANT_RATE_LIMITED instead. */
  maxWaitMs?: number;
}

export const quotaDefaults = {
  onLimit: 'reject',
  maxWaitMs: 30_000,
  /** A rate's burst when it names none: this many seconds' worth (at least one message). */
  burstSeconds: 1,
} as const satisfies Required<Pick<QuotaOptions, 'onLimit' | 'maxWaitMs'>> & { burstSeconds: number };

export interface ResolvedRate {
  readonly ratePerSecond: number;
  readonly burst: number;
}

export interface ResolvedQuotas {
  readonly default: ResolvedRate | undefined;
  readonly tenants: ReadonlyMap<string, ResolvedRate>;
  readonly onLimit: 'reject' | 'wait';
  readonly maxWaitMs: number;
}

const quotaOptionNames = optionNames<QuotaOptions>()('default', 'tenants', 'onLimit', 'maxWaitMs');
const rateOptionNames = optionNames<TenantRate>()('ratePerSecond', 'burst');

/** Adds what is wrong with `quotas` (at `prefix`, for example `tenancy.quotas.`) to `problems`. */
export function quotaProblems(problems: OptionProblems, quotas: QuotaOptions | undefined, prefix: string): void {
  if (quotas === undefined) return;
  problems.unknownKeys(quotas, quotaOptionNames, prefix);
  problems.oneOf(`${prefix}onLimit`, quotas.onLimit, ['reject', 'wait']);
  problems.integer(`${prefix}maxWaitMs`, quotas.maxWaitMs, 0, 3_600_000);
  const rate = (name: string, value: TenantRate | undefined) => {
    if (value === undefined) return;
    problems.check(typeof value === 'object' && value !== null, `${name} must be { ratePerSecond, burst? }, got ${JSON.stringify(value)}`);
    if (typeof value !== 'object' || value === null) return;
    problems.unknownKeys(value, rateOptionNames, `${name}.`);
    problems.check(value.ratePerSecond !== undefined, `${name}.ratePerSecond is required (messages per second)`);
    problems.number(`${name}.ratePerSecond`, value.ratePerSecond, 0.001, 1_000_000);
    problems.integer(`${name}.burst`, value.burst, 1, 1_000_000);
  };
  rate(`${prefix}default`, quotas.default);
  if (quotas.tenants === undefined) return;
  problems.check(typeof quotas.tenants === 'object' && quotas.tenants !== null, `${prefix}tenants must map tenant ids to rates`);
  for (const [tenant, value] of Object.entries(quotas.tenants ?? {})) {
    const bad = tenantProblem(tenant);
    if (bad !== undefined) problems.check(false, `${prefix}tenants: ${bad.message}`);
    else rate(`${prefix}tenants[${JSON.stringify(tenant)}]`, value);
  }
}

/** `quotas` with their defaults applied; checked by `quotaProblems` first. */
export function resolveQuotas(quotas: QuotaOptions): ResolvedQuotas {
  const rate = (value: TenantRate): ResolvedRate => ({
    ratePerSecond: value.ratePerSecond,
    burst: value.burst ?? Math.max(1, Math.ceil(value.ratePerSecond * quotaDefaults.burstSeconds)),
  });
  return {
    default: quotas.default === undefined ? undefined : rate(quotas.default),
    tenants: new Map(Object.entries(quotas.tenants ?? {}).map(([tenant, value]) => [tenant, rate(value)])),
    onLimit: quotas.onLimit ?? quotaDefaults.onLimit,
    maxWaitMs: quotas.maxWaitMs ?? quotaDefaults.maxWaitMs,
  };
}

/** Collects every bad option before throwing, so one error lists them all by name. */
export class OptionProblems {
  readonly #problems: string[] = [];
  constructor(readonly where: string) {}

  integer(name: string, value: unknown, min: number, max = Number.MAX_SAFE_INTEGER): void {
    if (value === undefined) return;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      this.#problems.push(`${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(value)}`);
    }
  }

  number(name: string, value: unknown, min: number, max: number): void {
    if (value === undefined) return;
    if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max) {
      this.#problems.push(`${name} must be a number from ${min} to ${max}, got ${JSON.stringify(value)}`);
    }
  }

  oneOf(name: string, value: unknown, allowed: readonly unknown[]): void {
    if (value === undefined) return;
    if (!allowed.includes(value)) {
      this.#problems.push(`${name} must be one of ${allowed.map((a) => JSON.stringify(a)).join(', ')}, got ${JSON.stringify(value)}`);
    }
  }

  /**
   * Reports every key of `options` that is not one of `known`: a misspelt option (`concurency: 4`) would
   * otherwise be ignored and its default used without a word. TypeScript catches it in an object literal,
   * not in options built from a config file, a spread or JavaScript (test/options.unit.test.ts).
   */
  unknownKeys(options: unknown, known: readonly string[], prefix = ''): void {
    if (options === null || typeof options !== 'object' || Array.isArray(options)) return;
    for (const key of Object.keys(options)) {
      if (known.includes(key)) continue;
      const near = known.find((name) => editDistance(name.toLowerCase(), key.toLowerCase()) <= 2);
      this.#problems.push(
        `${prefix}${key} is not an option${near === undefined ? ` (the options are ${known.map((name) => prefix + name).join(', ')})` : `: did you mean ${prefix}${near}?`}`,
      );
    }
  }

  check(condition: boolean, problem: string): void {
    if (!condition) this.#problems.push(problem);
  }

  throwIfAny(): void {
    if (this.#problems.length > 0) {
      throw new TidingsError('INVALID_OPTIONS', `Invalid options for ${this.where}: ${this.#problems.join('; ')}`);
    }
  }
}

/**
 * The names of an options type, for OptionProblems.unknownKeys: the compiler refuses a list that leaves one
 * out (`{ missing: ... }` names it), so the list cannot fall behind the type.
 */
export function optionNames<T extends object>() {
  return <const K extends readonly (keyof T & string)[]>(
    ...names: K & ([Exclude<keyof T, K[number]>] extends [never] ? unknown : { missing: Exclude<keyof T, K[number]> })
  ): readonly string[] => names;
}

const subscribeOptionNames = optionNames<SubscribeOptions>()(
  'concurrency',
  'partitions',
  'batchSize',
  'retry',
  'timeoutMs',
  'inbox',
  'startFrom',
  'requireTenant',
  'crossTenant',
  'tenantConcurrency',
  'tenantWeights',
);
const retryOptionNames = optionNames<RetryOptions>()('immediate', 'delayed', 'jitter');

/** Edits (insert, delete, replace a character) between two short names: a typo is one or two. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, index) => index);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) current[j] = Math.min(previous[j]! + 1, current[j - 1]! + 1, previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    previous = current;
  }
  return previous[b.length]!;
}

export function resolveSubscribeOptions(where: string, options: SubscribeOptions = {}): ResolvedSubscribeOptions {
  const problems = new OptionProblems(where);
  problems.unknownKeys(options, subscribeOptionNames);
  problems.unknownKeys(options.retry, retryOptionNames, 'retry.');
  problems.integer('concurrency', options.concurrency, 1, 10_000);
  problems.integer('partitions', options.partitions, 1, 1_024);
  problems.integer('batchSize', options.batchSize, 1, 10_000);
  problems.integer('timeoutMs', options.timeoutMs, 0);
  problems.oneOf('inbox', options.inbox, [true, false]);
  problems.oneOf('startFrom', options.startFrom, ['now', 'beginning']);
  problems.oneOf('requireTenant', options.requireTenant, [true, false]);
  problems.oneOf('crossTenant', options.crossTenant, [true, false]);
  problems.integer('tenantConcurrency', options.tenantConcurrency, 1, 10_000);
  if (options.tenantWeights !== undefined) {
    problems.check(
      typeof options.tenantWeights === 'object' &&
        options.tenantWeights !== null &&
        Object.values(options.tenantWeights).every((weight) => typeof weight === 'number' && Number.isFinite(weight) && weight > 0 && weight <= 1_000),
      `tenantWeights must map tenants to numbers above 0 and at most 1000, got ${JSON.stringify(options.tenantWeights)}`,
    );
  }
  const retry = options.retry ?? {};
  problems.integer('retry.immediate', retry.immediate, 0, 100);
  problems.number('retry.jitter', retry.jitter, 0, 1);
  if (retry.delayed !== undefined) {
    problems.check(
      Array.isArray(retry.delayed) && retry.delayed.every((d) => Number.isInteger(d) && d >= 0),
      `retry.delayed must be a list of delays in ms (integers >= 0), got ${JSON.stringify(retry.delayed)}`,
    );
  }
  problems.throwIfAny();
  const d = subscriptionDefaults;
  return {
    concurrency: options.concurrency ?? d.concurrency,
    partitions: options.partitions ?? d.partitions,
    batchSize: options.batchSize ?? d.batchSize,
    retry: {
      immediate: retry.immediate ?? d.retry.immediate,
      delayed: [...(retry.delayed ?? d.retry.delayed)],
      jitter: retry.jitter ?? d.retry.jitter,
    },
    timeoutMs: options.timeoutMs ?? d.timeoutMs,
    inbox: options.inbox ?? d.inbox,
    startFrom: options.startFrom ?? d.startFrom,
    requireTenant: options.requireTenant ?? d.requireTenant,
    crossTenant: options.crossTenant ?? d.crossTenant,
    tenantConcurrency: options.tenantConcurrency ?? d.tenantConcurrency,
    tenantWeights: { ...(options.tenantWeights ?? d.tenantWeights) },
  };
}
