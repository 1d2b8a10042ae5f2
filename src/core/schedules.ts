import { Cron } from 'croner';
import type { Backbone } from './backbone.ts';
import { validateName, validateNow, type AnyContract, type InputOf } from './contract.ts';
import { TidingsError } from './errors.ts';
import type { Clock, ClockTimer } from './clock.ts';
import type { PublishOptions } from './publish.ts';
import { runForTenant } from './tenant.ts';

/** What a recurring schedule publishes besides its data (its `tx`, `id` and time are the tick's). */
export interface ScheduleOptions extends Omit<PublishOptions, 'tx' | 'id' | 'deliverAt' | 'delayMs'> {
  /** The IANA time zone the pattern is read in (`Europe/Paris`); UTC by default. */
  timezone?: string;
  /**
   * A tick that passed while no process of the service ran: `'one'` fires the latest such tick once when a
   * process starts (default), `'none'` skips it.
   */
  missed?: 'one' | 'none';
}

export const scheduleDefaults = { timezone: 'UTC', missed: 'one' } as const satisfies Pick<Required<ScheduleOptions>, 'timezone' | 'missed'>;

/** Runs `fn` in a transaction and publishes in it: what a schedule's tick needs of the bus. */
interface TickPublisher<Tx> {
  readonly backbone: Backbone<Tx>;
  publish<C extends AnyContract>(contract: C, data: InputOf<C>, options: PublishOptions): Promise<unknown>;
  warn(message: string, error?: unknown): void;
  readonly clock: Clock;
}

/** Longest single wait: timers of more than ~24.8 days fire at once, and a clock may be adjusted meanwhile. */
const MAX_WAIT_MS = 60 * 60_000;

/**
 * One recurring schedule (`bus.schedule`): at each tick of its cron pattern, publishes its contract's
 * message, exactly once across every process that declares it. Every process runs the timer; at a tick,
 * each tries to claim it in a transaction (Backbone.claimTick) and only the one that claims it publishes,
 * in that same transaction, so the tick and its message commit together or not at all. On a backbone per
 * tenant (Backbone.tickTenants) each tick fires once per tenant, each claimed in that tenant's own storage.
 */
class Schedule<C extends AnyContract = AnyContract> {
  readonly #cron: Cron;
  /** What the backbone records with each tick: a change is reported when it differs from the stored one. */
  readonly definition: string;
  readonly timezone: string;
  readonly missed: 'one' | 'none';
  #timer: ClockTimer | undefined;
  #clock: Clock | undefined;
  #firing: Promise<void> | undefined;
  #stopped = false;

  constructor(
    readonly name: string,
    readonly pattern: string,
    readonly contract: C,
    private readonly data: InputOf<C> | ((tick: Date) => InputOf<C>),
    private readonly options: ScheduleOptions = {},
  ) {
    validateName('Schedule', name);
    if (contract?.topic === undefined)
      throw new TidingsError('INVALID_CONTRACT', `Schedule ${name}: give a contract (defineEvent or defineCommand), got ${typeof contract}`);
    this.timezone = options.timezone ?? scheduleDefaults.timezone;
    this.missed = options.missed ?? scheduleDefaults.missed;
    const problem = (what: string) => new TidingsError('INVALID_OPTIONS', `Invalid options for schedule ${name}: ${what}`);
    if (this.missed !== 'one' && this.missed !== 'none') throw problem(`missed must be "one" or "none", got ${JSON.stringify(this.missed)}`);
    try {
      this.#cron = new Cron(pattern, { paused: true, timezone: this.timezone });
    } catch (error) {
      throw problem(
        `cron pattern ${JSON.stringify(pattern)} is invalid (${(error as Error).message}); five fields (minute hour day month weekday), or six with seconds first`,
      );
    }
    try {
      if (this.#cron.nextRun() === null) throw new Error('it never fires');
    } catch (error) {
      throw problem(`cron pattern ${JSON.stringify(pattern)} in time zone ${JSON.stringify(this.timezone)} cannot be used: ${(error as Error).message}`);
    }
    this.definition = JSON.stringify({ pattern, timezone: this.timezone, topic: contract.topic });
  }

  /** The next tick strictly after `after` (epoch ms), if there is one. */
  nextTick(after: number): number | undefined {
    return this.#cron.nextRun(new Date(after))?.getTime();
  }

  /** The latest tick at or before `at`, if there is one. */
  previousTick(at: number): number | undefined {
    return this.#cron.previousRuns(1, new Date(at + 1))[0]?.getTime();
  }

  /** Starts ticking; first fires the tick missed while nothing ran, if `missed` says so. */
  async start(bus: TickPublisher<unknown>): Promise<void> {
    this.#stopped = false;
    this.#clock = bus.clock;
    await forEachTenant(bus, async () => {
      const last = await bus.backbone.lastTick!(this.name);
      if (last !== undefined && last.definition !== this.definition) {
        bus.warn(`Schedule ${this.name} changed from ${last.definition} to ${this.definition}: its ticks follow the new definition from now on`);
      }
      if (last !== undefined && this.missed === 'one') {
        const latest = this.previousTick(bus.clock.now());
        if (latest !== undefined && latest > last.tick) await this.#fireOne(bus, latest);
      }
    });
    this.#arm(bus);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    this.#clock?.clearTimeout(this.#timer);
    await this.#firing;
  }

  #arm(bus: TickPublisher<unknown>): void {
    if (this.#stopped) return;
    const tick = this.nextTick(bus.clock.now());
    if (tick === undefined) return;
    const wait = tick - bus.clock.now();
    this.#timer = bus.clock.setTimeout(
      () => {
        // A long wait is cut in pieces: re-arm until the tick is near.
        if (wait > MAX_WAIT_MS) return this.#arm(bus);
        this.#firing = this.#fire(bus, tick).finally(() => {
          this.#firing = undefined;
          this.#arm(bus);
        });
        return this.#firing;
      },
      Math.min(wait, MAX_WAIT_MS),
    );
  }

  /** Fires `tick` (once per tenant on a backbone per tenant: one tenant's failure does not hold up the others). */
  #fire(bus: TickPublisher<unknown>, tick: number): Promise<void> {
    return forEachTenant(bus, () => this.#fireOne(bus, tick));
  }

  /** Claims `tick` and publishes its message in one transaction; another process may have claimed it first. */
  async #fireOne(bus: TickPublisher<unknown>, tick: number): Promise<void> {
    const at = new Date(tick);
    try {
      await bus.backbone.transaction(async (tx) => {
        if (!(await bus.backbone.claimTick!(this.name, this.definition, tick, tx))) return;
        const data = typeof this.data === 'function' ? (this.data as (tick: Date) => InputOf<C>)(at) : this.data;
        const { timezone: _timezone, missed: _missed, ...publish } = this.options;
        await bus.publish(this.contract, data, { ...publish, tx, id: `${this.name}@${at.toISOString()}` });
      });
    } catch (error) {
      bus.warn(`Schedule ${this.name}: the tick of ${at.toISOString()} could not be published; a later tick will be`, error);
    }
  }
}

/** Runs `fn` once, or once per tenant inside `withTenant` on a backbone that names its tenants for ticks; a tenant's failure is warned and the others go on. */
async function forEachTenant(bus: TickPublisher<unknown>, fn: () => Promise<void>): Promise<void> {
  const tenants = bus.backbone.tickTenants?.();
  if (tenants === undefined) return fn();
  for (const tenant of tenants) {
    try {
      await runForTenant(tenant, undefined, fn);
    } catch (error) {
      bus.warn(`Schedules: tenant ${tenant}'s ticks could not be read or fired; its next tick is tried again`, error);
    }
  }
}

/**
 * A bus's schedules (`bus.schedule`): declared by name, started with the bus (or at once when declared on a
 * running bus), stopped with it.
 */
export class Schedules {
  readonly #all = new Map<string, Schedule>();
  readonly #publisher: TickPublisher<unknown>;

  constructor(publisher: TickPublisher<unknown>) {
    this.#publisher = publisher;
  }

  /** Declares a schedule, refusing a second one of the same name and a backbone that cannot claim ticks. */
  add<C extends AnyContract>(
    name: string,
    pattern: string,
    contract: C,
    data: InputOf<C> | ((tick: Date) => InputOf<C>),
    options: ScheduleOptions,
  ): Schedule<C> {
    const { backbone } = this.#publisher;
    if (this.#all.has(name)) {
      throw new TidingsError(
        'SUBSCRIPTION_CONFLICT',
        `Schedule ${name} is already declared on this bus (${this.#all.get(name)!.definition}); give the other one a name of its own`,
      );
    }
    if (backbone.claimTick === undefined || backbone.lastTick === undefined) {
      throw new TidingsError('INVALID_OPTIONS', `Schedule ${name}: the ${backbone.name} backbone cannot run recurring schedules`);
    }
    const schedule = new Schedule(name, pattern, contract, data, options);
    // Fixed data is checked now, so a mistake shows at start, not at the first tick.
    if (typeof data !== 'function') {
      const checked = validateNow(contract, data, { topic: contract.topic });
      if (checked instanceof Promise) checked.catch(() => undefined);
    }
    this.#all.set(name, schedule);
    return schedule;
  }

  get size(): number {
    return this.#all.size;
  }

  /** The contracts the schedules publish. */
  get contracts(): AnyContract[] {
    return [...this.#all.values()].map((schedule) => schedule.contract);
  }

  /** Starts every schedule, one after another. */
  async startAll(): Promise<void> {
    for (const schedule of this.#all.values()) await schedule.start(this.#publisher);
  }

  /** Starts one schedule declared once the bus runs. */
  start(schedule: Schedule): Promise<void> {
    return schedule.start(this.#publisher);
  }

  async stop(): Promise<void> {
    await Promise.all([...this.#all.values()].map((schedule) => schedule.stop()));
  }
}
