/**
 * Where the bus and the memory backbone read the time and set their timers: the system's, or a virtual one
 * a test moves forward by hand (`tidings/testing`), so that retries, scheduled messages, schedules' ticks and
 * saga timeouts hours away fire in a test that takes milliseconds, in a deterministic order.
 */
export interface Clock {
  now(): number;
  /** `fn` may return a promise: a virtual clock waits for it before it moves on (a schedule's tick publishes). */
  setTimeout(fn: () => unknown, ms: number): ClockTimer;
  clearTimeout(timer: ClockTimer | undefined): void;
}

/** A timer of a clock; `unref` where the system's has one. */
export interface ClockTimer {
  unref?(): unknown;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (timer) => clearTimeout(timer as NodeJS.Timeout | undefined),
};

interface VirtualTimer extends ClockTimer {
  readonly at: number;
  readonly seq: number;
  readonly fn: () => unknown;
  cancelled: boolean;
}

const UNITS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `1500`, `'1500ms'`, `'30s'`, `'5m'`, `'1h'`, `'2d'` in milliseconds. */
export function duration(value: number | string): number {
  if (typeof value === 'number' && Number.isFinite(value) && value >= 0) return value;
  const match = typeof value === 'string' ? /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$/.exec(value.trim()) : null;
  if (match === null) throw new RangeError(`A duration is milliseconds or a number with ms, s, m, h or d (such as "30s", "1h"), got ${JSON.stringify(value)}`);
  return Number(match[1]) * UNITS[match[2]!]!;
}

/** A clock that moves only when told: `advance` fires the timers due on the way, in order. */
export class VirtualClock implements Clock {
  #now: number;
  #seq = 0;
  readonly #timers: VirtualTimer[] = [];

  constructor(start: Date | number = Date.now()) {
    this.#now = typeof start === 'number' ? start : start.getTime();
  }

  now(): number {
    return this.#now;
  }

  setTimeout(fn: () => unknown, ms: number): ClockTimer {
    const timer: VirtualTimer = { at: this.#now + Math.max(0, ms), seq: this.#seq++, fn, cancelled: false, unref: () => timer };
    this.#timers.push(timer);
    return timer;
  }

  clearTimeout(timer: ClockTimer | undefined): void {
    if (timer !== undefined) (timer as VirtualTimer).cancelled = true;
  }

  /**
   * Moves the time forward by `by`, firing every timer due on the way in the order they are due (and set),
   * each at its own time; after each, `settle` lets what it started finish (the test kit drains the bus), so
   * timers it sets within the span fire too.
   */
  async advance(by: number | string, settle: () => Promise<void> = async () => undefined): Promise<void> {
    const until = this.#now + duration(by);
    await settle();
    for (;;) {
      const next = this.#next(until);
      if (next === undefined) break;
      this.#now = Math.max(this.#now, next.at);
      next.cancelled = true;
      await next.fn();
      await settle();
    }
    this.#now = until;
    await settle();
  }

  /** The timer due first by `until`, if any (cancelled ones are dropped on the way). */
  #next(until: number): VirtualTimer | undefined {
    let best: VirtualTimer | undefined;
    for (let i = this.#timers.length - 1; i >= 0; i--) {
      const timer = this.#timers[i]!;
      if (timer.cancelled) {
        this.#timers.splice(i, 1);
        continue;
      }
      if (timer.at <= until && (best === undefined || timer.at < best.at || (timer.at === best.at && timer.seq < best.seq))) best = timer;
    }
    return best;
  }
}
