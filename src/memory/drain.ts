/** Waiting for the memory backbone to have nothing left to do: `drain()`, what tests await after publishing. */
import { TidingsError } from '../core/errors.ts';
import { OptionProblems } from '../core/options.ts';
import type { Group } from './consume/group.ts';
import type { DrainOptions } from './options.ts';

interface Waiter {
  /** Also waits for keys that wait for a retry. */
  readonly retries: boolean;
  resolve(): void;
  reject(error: unknown): void;
  timer: NodeJS.Timeout | undefined;
}

export class Drains {
  readonly #groups: () => Iterable<Group>;
  readonly #timeoutMs: number;
  readonly #waiters = new Set<Waiter>();

  /** `groups`: the backbone's subscriptions; `timeoutMs`: the default wait (drainTimeoutMs). */
  constructor(groups: () => Iterable<Group>, timeoutMs: number) {
    this.#groups = groups;
    this.#timeoutMs = timeoutMs;
  }

  /** See MemoryBackbone#drain. */
  drain(options: DrainOptions = {}): Promise<void> {
    const problems = new OptionProblems('drain()');
    problems.integer('timeoutMs', options.timeoutMs, 0);
    problems.throwIfAny();
    const retries = options.retries ?? true;
    if (this.#idle(retries)) return Promise.resolve();
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = { retries, resolve, reject, timer: undefined };
      if (timeoutMs > 0) {
        waiter.timer = setTimeout(() => {
          this.#waiters.delete(waiter);
          const busy = [...this.#groups()].filter((group) => group.running && group.outstanding > 0);
          reject(
            new TidingsError(
              'TIMEOUT',
              `drain() gave up after ${timeoutMs} ms: ${busy.map((group) => group.describe()).join('; ')}. A handler may keep failing (see bus.stats() and deadLetters()), retry delays may be longer than the wait (use short retry.delayed in tests), or handlers may publish without end; pass a longer timeoutMs if it is only slow`,
            ),
          );
        }, timeoutMs);
      }
      this.#waiters.add(waiter);
    });
  }

  /** A subscription may have become idle: the waiters look again. */
  check(): void {
    if (this.#waiters.size === 0) return;
    for (const waiter of [...this.#waiters]) {
      if (!this.#idle(waiter.retries)) continue;
      this.#waiters.delete(waiter);
      clearTimeout(waiter.timer);
      waiter.resolve();
    }
  }

  #idle(retries: boolean): boolean {
    for (const group of this.#groups()) if (group.running && (retries ? group.outstanding : group.outstanding - group.waiting) > 0) return false;
    return true;
  }
}
