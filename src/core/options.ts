import { TidingsError } from './errors.ts';

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
}

export const subscriptionDefaults = {
  concurrency: 8,
  partitions: 4,
  batchSize: 500,
  retry: { immediate: 2, delayed: [1_000, 10_000, 60_000], jitter: 0.1 },
  timeoutMs: 30_000,
  inbox: true,
  startFrom: 'now',
} as const satisfies Required<SubscribeOptions>;

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
}

export const busDefaults = {
  /** Largest `data` accepted at publish, in bytes of JSON. */
  maxPayloadBytes: 256 * 1024,
  /** How long `bus.request` waits for its reply. */
  requestTimeoutMs: 30_000,
} as const;

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

  check(condition: boolean, problem: string): void {
    if (!condition) this.#problems.push(problem);
  }

  throwIfAny(): void {
    if (this.#problems.length > 0) {
      throw new TidingsError('INVALID_OPTIONS', `Invalid options for ${this.where}: ${this.#problems.join('; ')}`);
    }
  }
}

export function resolveSubscribeOptions(where: string, options: SubscribeOptions = {}): ResolvedSubscribeOptions {
  const problems = new OptionProblems(where);
  problems.integer('concurrency', options.concurrency, 1, 10_000);
  problems.integer('partitions', options.partitions, 1, 1_024);
  problems.integer('batchSize', options.batchSize, 1, 10_000);
  problems.integer('timeoutMs', options.timeoutMs, 0);
  problems.oneOf('inbox', options.inbox, [true, false]);
  problems.oneOf('startFrom', options.startFrom, ['now', 'beginning']);
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
  };
}
