import { systemClock, type Clock } from './clock.ts';

/**
 * Waits `ms` on `clock` (the system's by default), or less if `signal` aborts (never rejects): for backoffs
 * and pacing that a stop must cut short.
 */
export function sleep(ms: number, signal?: AbortSignal, clock: Clock = systemClock): Promise<void> {
  return new Promise((resolve) => {
    if (ms <= 0 || signal?.aborted === true) return resolve();
    const timer = clock.setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    function done(): void {
      clock.clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
  });
}
