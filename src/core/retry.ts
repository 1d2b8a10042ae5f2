import type { DeliveryResult } from './backbone.ts';
import type { ErrorRecord } from './errors.ts';
import type { ResolvedRetry } from './options.ts';

/** After attempt `attempt` (1-based) failed: retry now (0), retry after a delay, or give up (undefined). */
export function nextRetryDelay(retry: ResolvedRetry, attempt: number, random = Math.random): number | undefined {
  if (attempt <= retry.immediate) return 0;
  const base = retry.delayed[attempt - retry.immediate - 1];
  if (base === undefined) return undefined;
  const spread = base * retry.jitter;
  return Math.max(0, Math.round(base - spread + random() * 2 * spread));
}

/** What the policy makes of a failed attempt: a retry now or later, or a dead letter once the retries are spent. */
export function afterFailure(retry: ResolvedRetry, attempt: number, error: ErrorRecord): DeliveryResult {
  const delay = nextRetryDelay(retry, attempt);
  if (delay === undefined) return exhausted(attempt, error);
  return { outcome: 'retry', delayMs: delay, error };
}

export function exhausted(attempt: number, error: ErrorRecord): DeliveryResult {
  return { outcome: 'dead-letter', reason: `failed ${attempt} attempt${attempt === 1 ? '' : 's'}; last error: ${error.message}`, error };
}
