/** The memory backbone's options, their defaults, and their validation. */
import { systemClock, type Clock } from '../core/clock.ts';
import { OptionProblems, optionNames, quotaProblems, resolveQuotas, type QuotaOptions, type ResolvedQuotas } from '../core/options.ts';
import { defaultWarning } from '../core/warnings.ts';

export interface MemoryOptions {
  /**
   * Committed messages kept for subscriptions created later with `startFrom: 'beginning'`. Beyond it the
   * oldest are forgotten (existing subscriptions have their own queues and lose nothing); a subscription
   * that starts from the beginning after that is warned that it starts at the oldest message kept.
   */
  maxLog?: number;
  /** Handled message ids each subscription with `inbox` remembers, to handle a redriven or re-published id once. */
  maxInbox?: number;
  /** Dead letters kept; beyond it the oldest are dropped, with a warning. */
  maxDeadLetters?: number;
  /** How long `drain()` waits by default before it rejects with a TIMEOUT error saying what is left. */
  drainTimeoutMs?: number;
  /** Called with what the backbone recovers from or drops by itself (see maxLog, maxDeadLetters). */
  onWarning?: (message: string, error?: unknown) => void;
  /** The clock of retries and scheduled messages: the system's, or a virtual one (tidings/testing). */
  clock?: Clock;
  /** Per-tenant publish rates (docs/tenancy.md, "Quotas"), counted on `clock`: a budget per backbone object. */
  tenancy?: { quotas?: QuotaOptions };
}

export const memoryDefaults = {
  maxLog: 100_000,
  maxInbox: 100_000,
  maxDeadLetters: 100_000,
  drainTimeoutMs: 10_000,
} as const satisfies Required<Omit<MemoryOptions, 'onWarning' | 'clock' | 'tenancy'>>;

export interface DrainOptions {
  /** Reject with a TIMEOUT error after this long (default `drainTimeoutMs`); 0 waits for ever. */
  timeoutMs?: number;
  /**
   * Wait for keys that wait for a delayed retry too (default true). False resolves once nothing can run
   * now: what a test with a virtual clock waits for before it moves the clock (tidings/testing).
   */
  retries?: boolean;
}

/** The options resolved: every default applied. */
export interface MemorySettings {
  readonly maxLog: number;
  readonly maxInbox: number;
  readonly maxDeadLetters: number;
  readonly drainTimeoutMs: number;
  readonly warn: (message: string, error?: unknown) => void;
  readonly clock: Clock;
  readonly quotas: ResolvedQuotas | undefined;
}

/** Checks every option (OptionProblems names each bad one) and applies the defaults. */
export function resolveMemoryOptions(options: MemoryOptions): MemorySettings {
  const problems = new OptionProblems('memory()');
  problems.unknownKeys(options, optionNames<MemoryOptions>()('maxLog', 'maxInbox', 'maxDeadLetters', 'drainTimeoutMs', 'onWarning', 'clock', 'tenancy'));
  problems.unknownKeys(options.tenancy, ['quotas'], 'tenancy.');
  quotaProblems(problems, options.tenancy?.quotas, 'tenancy.quotas.');
  problems.integer('maxLog', options.maxLog, 0);
  problems.integer('maxInbox', options.maxInbox, 0);
  problems.integer('maxDeadLetters', options.maxDeadLetters, 1);
  problems.integer('drainTimeoutMs', options.drainTimeoutMs, 0);
  problems.check(options.onWarning === undefined || typeof options.onWarning === 'function', 'onWarning must be a function (message, error) => void');
  problems.throwIfAny();
  return {
    maxLog: options.maxLog ?? memoryDefaults.maxLog,
    maxInbox: options.maxInbox ?? memoryDefaults.maxInbox,
    maxDeadLetters: options.maxDeadLetters ?? memoryDefaults.maxDeadLetters,
    drainTimeoutMs: options.drainTimeoutMs ?? memoryDefaults.drainTimeoutMs,
    warn: options.onWarning ?? defaultWarning,
    clock: options.clock ?? systemClock,
    quotas: options.tenancy?.quotas === undefined ? undefined : resolveQuotas(options.tenancy.quotas),
  };
}
