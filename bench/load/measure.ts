/** Counting, waiting, producing and warming up: what every child's workloads are made of. */
import type { ChildResult, Task } from '../protocol.ts';

export type WorkloadFn = (task: Task) => Promise<ChildResult>;

/** Counts handled messages; `until(n)` resolves when the count reaches n. */
export class Counter {
  count = 0;
  #waiters: Array<{ n: number; resolve: () => void }> = [];
  add(k = 1): void {
    this.count += k;
    if (this.#waiters.length === 0) return;
    this.#waiters = this.#waiters.filter((w) => {
      if (this.count >= w.n) {
        w.resolve();
        return false;
      }
      return true;
    });
  }
  until(n: number, timeoutMs: number, what = 'messages'): Promise<void> {
    if (this.count >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${n} ${what}; got ${this.count}`)), timeoutMs);
      this.#waiters.push({
        n,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      });
    });
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
/**
 * Milliseconds on the machine's monotonic clock (CLOCK_MONOTONIC, the same in every process): a time taken
 * in the producers' process and one taken in the consumer's can be subtracted.
 */
export const now = () => Number(process.hrtime.bigint()) / 1e6;

/** Polls `check` every `everyMs` until it is true. */
export async function pollUntil(check: () => Promise<boolean>, timeoutMs: number, what: string, everyMs = 5): Promise<void> {
  const deadline = now() + timeoutMs;
  while (!(await check())) {
    if (now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await sleep(everyMs);
  }
}

/** How much the producers publish: a number of events, or for a time (`ms`). */
export type Amount = number | { ms: number };

/**
 * Runs `producers` loops that each take the next sequence number, until `amount` events are taken or its
 * time is up (no call starts after it). Returns how many were taken.
 */
export async function produce(amount: Amount, producers: number, fn: (seq: number, producer: number) => Promise<unknown>): Promise<number> {
  const total = typeof amount === 'number' ? amount : Number.POSITIVE_INFINITY;
  const deadline = typeof amount === 'number' ? Number.POSITIVE_INFINITY : now() + amount.ms;
  let next = 0;
  await Promise.all(
    Array.from({ length: producers }, async (_, producer) => {
      while (next < total && now() < deadline) {
        const seq = next++;
        await fn(seq, producer);
      }
    }),
  );
  return next;
}

/**
 * What workloads 3 and 4 measure: `publishSeconds` of publishing, so that a fast system is measured over
 * tens of thousands of events rather than a few hundred milliseconds of its start (4,000 events: Tidings
 * 8.2k/s and BullMQ 10.3k/s standalone, where 16,000 gave 11.5k and 18.0k) and a slow one does not stretch
 * the run; or `events` events where the task says so (the producers-only row, sized like the raw floor's).
 */
export function measuredAmount(task: Task): Amount {
  return task.publishSeconds > 0 ? { ms: task.publishSeconds * 1_000 } : task.events;
}

/**
 * End to end (workloads 3 and 4): every system first runs events through for a third of the measured
 * time (or a quarter of the measured events), unmeasured, so the figures are those of a process whose hot
 * path V8 has compiled rather than of its first second (a fresh Tidings process did ~3k/s over its first
 * 4,000 events, ~5k/s over the next). The same for every system; none with `--quick`.
 */
function warmUpAmount(task: Task): Amount {
  return task.publishSeconds > 0 && !task.quick ? { ms: (task.publishSeconds * 1_000) / 3 } : warmUpEvents(task);
}

/** The task's warm-up events (the plan sets them: 0 for a cold start); none with `--quick`. */
function warmUpEvents(task: Task): number {
  return task.quick ? 0 : task.warmUpEvents;
}

/**
 * Drain and bulk (workloads 1, 2): the measured run follows an unmeasured one of `warmUpEvents` in the same
 * process (a fresh Tidings process drained 10,000 events at ~20k/s and 40,000 at ~35k/s: its first few
 * thousand run before V8 has compiled the hot path); a cold row has none. `run` must clean up after itself.
 */
export function warmedUp(run: WorkloadFn): WorkloadFn {
  return async (task) => {
    const warm = warmUpEvents(task);
    if (warm > 0) await run({ ...task, events: warm });
    return run(task);
  };
}

/** The warm-up's first sequence number: its keys (with `keys: 0`, one per event) are not the measured ones. */
export const WARM_UP_FIRST = 1_000_000_000;

/**
 * Runs the warm-up: `publish` for each of its events (numbered apart from the measured ones); with a
 * consumer, waits until it has handled (`counter`) and acknowledged (`acknowledged(n)`) them all. Returns
 * their number.
 */
export async function warmUp(
  task: Task,
  producers: number,
  publish: (seq: number) => Promise<unknown>,
  consumer?: { counter: Counter; acknowledged: (n: number) => Promise<boolean> },
): Promise<number> {
  return warmUpWith(task, (amount, first) => produce(amount, producers, (seq) => publish(first + seq)), consumer);
}

/** The warm-up with producers that may run elsewhere: `run(amount, first)` publishes and says how many. */
export async function warmUpWith(
  task: Task,
  run: (amount: Amount, first: number) => Promise<number>,
  consumer?: { counter: Counter; acknowledged: (n: number) => Promise<boolean>; subscriptions?: number },
): Promise<number> {
  const amount = warmUpAmount(task);
  if (amount === 0) return 0;
  const n = await run(amount, WARM_UP_FIRST);
  if (consumer !== undefined) {
    await consumer.counter.until(n * (consumer.subscriptions ?? 1), task.timeoutMs, 'warm-up messages');
    await pollUntil(() => consumer.acknowledged(n), 60_000, 'warm-up acknowledged');
  }
  return n;
}

// ---- statistics ---------------------------------------------------------------------------------

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

export const CHART_PERCENTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 100];

/** Throughput in events/s. */
export function rate(events: number, ms: number): number {
  return (events * 1000) / ms;
}
