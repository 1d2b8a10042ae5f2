/**
 * `tidings/testing`: a test kit for handlers and sagas. A bus on the memory backbone with a virtual clock
 * (`advance('1h')` fires delayed retries, scheduled messages, schedules' ticks and saga timeouts due in that
 * hour, in order, in milliseconds), and given/when/then helpers that publish, let everything settle, and
 * say what was published, dead-lettered and saved with readable failures. The same test runs on a real
 * backbone by passing it (`testBus({ backbone: postgres({ url }) })`): the clock is then the system's, and
 * `advance` waits for real.
 */
import { AssertionError } from 'node:assert';
import type { Backbone } from '../core/backbone.ts';
import { createBus, type Bus } from '../core/bus.ts';
import type { BusOptions } from '../core/bus-options.ts';
import { duration, systemClock, VirtualClock } from '../core/clock.ts';
import type { AnyContract, DataOf, InputOf } from '../core/contract.ts';
import type { DeadLetterSummary } from '../core/dead-letters.ts';
import { toMessage, type Envelope, type Message } from '../core/envelope.ts';
import type { PublishedMessage, PublishOptions } from '../core/publish.ts';
import type { SagaDefinition } from '../core/saga.ts';
import { memory, MemoryBackbone, type MemoryTransaction } from '../memory/index.ts';

export { VirtualClock, duration } from '../core/clock.ts';

export interface TestBusOptions<Tx> extends Omit<BusOptions<Tx>, 'backbone' | 'service' | 'clock'> {
  /** The service's name (default `test`). */
  service?: string;
  /** A real backbone to run the same test on; the memory backbone with a virtual clock by default. */
  backbone?: Backbone<Tx>;
  /** Where the virtual clock starts (default: now). */
  startAt?: Date | number;
}

/** A bus to test with, and what a test asks of it. */
/** What the kit reads from a real backbone: lag, to settle; its messages, for published(). PostgreSQL offers both. */
interface Observable {
  lag?(subscription: string): Promise<number>;
  messages?(topic?: string): Promise<Envelope[]>;
}

export class TestBus<Tx = MemoryTransaction> {
  readonly bus: Bus<Tx>;
  readonly backbone: Backbone<Tx>;
  /** The virtual clock, on the memory backbone; undefined on a real one. */
  readonly clock: VirtualClock | undefined;
  /** On a real backbone: its newest messages as of the last settle. */
  #seen: Envelope[] | undefined;

  constructor(options: TestBusOptions<Tx> = {}) {
    const { service = 'test', backbone, startAt, ...rest } = options;
    this.clock = backbone === undefined ? new VirtualClock(startAt) : undefined;
    this.backbone = backbone ?? (memory({ clock: this.clock, onWarning: () => undefined }) as unknown as Backbone<Tx>);
    this.bus = createBus<Tx>({ ...rest, service, backbone: this.backbone, clock: this.clock ?? systemClock });
  }

  start(): Promise<void> {
    return this.bus.start();
  }

  stop(): Promise<void> {
    return this.bus.stop();
  }

  /** Publishes what happened before: like `when`, for the story's start. */
  given<C extends AnyContract>(contract: C, data: InputOf<C>, options?: PublishOptions): Promise<PublishedMessage> {
    return this.when(contract, data, options);
  }

  /** Publishes (or sends) a message and waits until everything it sets off now is done. */
  async when<C extends AnyContract>(contract: C, data: InputOf<C>, options?: PublishOptions): Promise<PublishedMessage> {
    const published = contract.kind === 'command' ? await this.bus.send(contract, data, options) : await this.bus.publish(contract, data, options);
    await this.settle();
    return published;
  }

  /** Lets time pass (`'30s'`, `'1h'`, ms): what falls due meanwhile runs, in order, and settles. */
  async advance(by: number | string): Promise<void> {
    if (this.clock !== undefined) return this.clock.advance(by, () => this.settle());
    await new Promise((resolve) => setTimeout(resolve, duration(by)));
    await this.settle();
  }

  /** Waits until nothing is left to do now: no message queued or in flight (delayed retries wait for their time). */
  async settle(): Promise<void> {
    if (this.backbone instanceof MemoryBackbone) {
      // A retry or a scheduled message due later is not "left to do now": the drain ignores waiting keys.
      await this.backbone.drain({ timeoutMs: 10_000, retries: this.clock === undefined });
      return;
    }
    const real = this.backbone as Backbone<Tx> & Observable;
    if (real.lag === undefined) throw new Error(`settle() needs the memory backbone or one that reports lag (PostgreSQL); ${this.backbone.name} does not`);
    const deadline = Date.now() + 30_000;
    for (;;) {
      const lags = await Promise.all([...this.bus.subscriptions.keys()].map((name) => real.lag!(name)));
      if (lags.every((n) => n === 0)) break;
      if (Date.now() > deadline) throw new Error(`settle() waited 30 s; still behind: ${lags.join(', ')}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    this.#seen = (await real.messages?.()) ?? undefined;
  }

  /** The messages of `contract` published so far (by the test and by handlers), oldest first, typed. */
  published<C extends AnyContract>(contract: C): Message<DataOf<C>>[] {
    const envelopes =
      this.backbone instanceof MemoryBackbone ? this.backbone.messages(contract.topic) : this.#seen?.filter((envelope) => envelope.topic === contract.topic);
    if (envelopes === undefined)
      throw new Error(
        `published() reads the memory backbone, or a backbone that lists its messages (PostgreSQL) after when(), given() or settle(); ${this.backbone.name} does not`,
      );
    return envelopes.map((envelope) => toMessage(envelope, envelope.data as DataOf<C>));
  }

  /**
   * Asserts that a message of `contract` was published, whose data has every field of `expected` (or that
   * satisfies it, given a function); the failure lists what was published instead.
   */
  expectPublished<C extends AnyContract>(contract: C, expected: Partial<DataOf<C>> | ((data: DataOf<C>) => boolean) = {}): Message<DataOf<C>> {
    const all = this.published(contract);
    const matches = (data: DataOf<C>) =>
      typeof expected === 'function'
        ? expected(data)
        : Object.entries(expected).every(([field, value]) => JSON.stringify((data as Record<string, unknown>)[field]) === JSON.stringify(value));
    const found = all.find((message) => matches(message.data));
    if (found !== undefined) return found;
    throw new AssertionError({
      message: `No ${contract.topic} message ${typeof expected === 'function' ? 'satisfies the predicate' : `with ${JSON.stringify(expected)}`}; published: ${all.length === 0 ? 'none' : all.map((message) => JSON.stringify(message.data)).join(', ')}`,
    });
  }

  /** Asserts that no message of `contract` was published; the failure lists those that were. */
  expectNotPublished(contract: AnyContract): void {
    const all = this.published(contract);
    if (all.length > 0)
      throw new AssertionError({
        message: `${contract.topic} was published ${all.length} time(s): ${all.map((message) => JSON.stringify(message.data)).join(', ')}`,
      });
  }

  /** The saga instance's saved state (undefined if it never started), and whether it completed. */
  async saga<S>(
    definition: SagaDefinition<S, Record<string, AnyContract>>,
    id: string,
  ): Promise<{ state: S; version: number; completed: boolean } | undefined> {
    const store = this.backbone.sagas?.();
    if (store === undefined) throw new Error(`The ${this.backbone.name} backbone keeps no saga state`);
    const row = await store.find(definition.name, id);
    return row === undefined ? undefined : { state: row.state as S, version: row.version, completed: row.completed };
  }

  /** The dead letters so far. */
  async deadLetters(): Promise<DeadLetterSummary[]> {
    return (await this.backbone.deadLetters().list({ all: true, limit: 1_000 })).deadLetters;
  }
}

/** A bus to test handlers and sagas with: see TestBus. Start it after subscribing, stop it after the test. */
export function testBus<Tx = MemoryTransaction>(options: TestBusOptions<Tx> = {}): TestBus<Tx> {
  return new TestBus<Tx>(options);
}
