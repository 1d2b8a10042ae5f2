/**
 * The memory backbone: Tidings in one process, with no server, for unit tests of handlers and quick
 * examples. It keeps PostgreSQL's semantics where they apply: transactional publish, commit order,
 * subscriptions as consumer groups with partitioned lanes, per-key order, retries that hold only their
 * key, dead letters with their history and redrive, an inbox per subscription, graceful stop. Nothing is
 * durable: the state lives as long as the backbone object. docs/memory.md describes it.
 */
import { EVERY_TOPIC, type Backbone, type Consumer, type DeliveryHandler, type Outgoing, type SubscriptionSpec } from '../core/backbone.ts';
import type { DeadLetterStore } from '../core/broker.ts';
import { TidingsError } from '../core/errors.ts';
import { OptionProblems } from '../core/options.ts';
import { DeadLetterBook } from './dead-letters.ts';
import { Deque } from './deque.ts';
import { Group, MemoryWorker, type GroupContext, type Stored } from './subscription.ts';
import { enlist, finish, MemoryTransaction } from './transaction.ts';

export { MemoryTransaction, type MemoryTransactionState } from './transaction.ts';

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
}

export const memoryDefaults = {
  maxLog: 100_000,
  maxInbox: 100_000,
  maxDeadLetters: 100_000,
  drainTimeoutMs: 10_000,
} as const satisfies Required<Omit<MemoryOptions, 'onWarning'>>;

export interface DrainOptions {
  /** Reject with a TIMEOUT error after this long (default `drainTimeoutMs`); 0 waits for ever. */
  timeoutMs?: number;
}

interface Waiter {
  resolve(): void;
  reject(error: unknown): void;
  timer: NodeJS.Timeout | undefined;
}

function defaultWarning(message: string, error?: unknown): void {
  const detail = error instanceof Error ? `: ${error.message}` : '';
  console.warn(`[tidings] ${message}${detail}`);
}

/**
 * Publishing appends to one log in commit order and copies a reference into the queue of each
 * subscription of the topic, by lane and key; workers take ready keys from their lanes. Every step is
 * O(1) per message, so a test suite can push 100k messages through it.
 */
export class MemoryBackbone implements Backbone<MemoryTransaction> {
  readonly name = 'memory';
  readonly #maxLog: number;
  readonly #maxInbox: number;
  readonly #drainTimeoutMs: number;
  readonly #warn: (message: string, error?: unknown) => void;
  readonly #log = new Deque<Stored>();
  /** Messages forgotten by the log (maxLog). */
  #forgotten = 0;
  #seq = 0;
  readonly #groups = new Map<string, Group>();
  /** Subscriptions by topic, and those of every topic: a publish finds its subscriptions in O(1). */
  readonly #byTopic = new Map<string, Group[]>();
  #everyTopic: Group[] = [];
  readonly #deadLetters: DeadLetterBook;
  readonly #waiters = new Set<Waiter>();
  readonly #ctx: GroupContext;

  constructor(options: MemoryOptions = {}) {
    const problems = new OptionProblems('memory()');
    problems.integer('maxLog', options.maxLog, 0);
    problems.integer('maxInbox', options.maxInbox, 0);
    problems.integer('maxDeadLetters', options.maxDeadLetters, 1);
    problems.integer('drainTimeoutMs', options.drainTimeoutMs, 0);
    problems.check(options.onWarning === undefined || typeof options.onWarning === 'function', 'onWarning must be a function (message, error) => void');
    problems.throwIfAny();
    this.#maxLog = options.maxLog ?? memoryDefaults.maxLog;
    this.#maxInbox = options.maxInbox ?? memoryDefaults.maxInbox;
    this.#drainTimeoutMs = options.drainTimeoutMs ?? memoryDefaults.drainTimeoutMs;
    this.#warn = options.onWarning ?? defaultWarning;
    this.#deadLetters = new DeadLetterBook(options.maxDeadLetters ?? memoryDefaults.maxDeadLetters, (message) => this.#warn(message));
    this.#ctx = {
      begin: (what) => new MemoryTransaction(this, what),
      end: (tx, commit) => this.#finish(tx, commit),
      deadLetter: (subscription, entry, reason) => this.#deadLetters.add(subscription, entry, reason),
      settled: () => this.#checkIdle(),
      retopic: () => this.#index(),
      warn: (message, error) => this.#warn(message, error),
      maxInbox: this.#maxInbox,
    };
  }

  /** Nothing to connect to. The state lives in this object, so it may be opened again after close(). */
  async open(): Promise<void> {}

  /** Without `tx`, the messages are committed when this resolves; with it, when that transaction commits. */
  async publish(messages: readonly Outgoing[], tx?: MemoryTransaction): Promise<void> {
    if (tx !== undefined) {
      enlist(tx, this, messages);
      return;
    }
    this.#commit(messages);
  }

  /** Runs `fn` with a transaction; what it published is committed iff `fn` resolves, and discarded if it throws. */
  async transaction<T>(fn: (tx: MemoryTransaction) => Promise<T>): Promise<T> {
    const tx = new MemoryTransaction(this, 'bus.transaction()');
    let result: T;
    try {
      result = await fn(tx);
    } catch (error) {
      this.#finish(tx, false);
      throw error;
    }
    this.#finish(tx, true);
    return result;
  }

  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<MemoryTransaction>): Promise<Consumer> {
    let group = this.#groups.get(spec.name);
    if (group === undefined) {
      group = new Group(spec, this.#ctx);
      this.#groups.set(spec.name, group);
      this.#index();
      if (spec.startFrom === 'beginning') this.#replayLog(group);
    } else {
      if (group.partitions !== spec.partitions) {
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Subscription ${spec.name} exists with ${group.partitions} partitions, not ${spec.partitions}: changing the count would break per-key order. Keep partitions: ${group.partitions}, or use a new subscription name`,
        );
      }
      // Its topics are settled from its workers when this one attaches; the latest declaration's inbox applies.
      group.inbox = spec.inbox;
    }
    const worker = new MemoryWorker(group, spec, handle, this.#ctx);
    group.attach(worker);
    return worker;
  }

  deadLetters(): DeadLetterStore {
    return this.#deadLetters.store((subscription, entries) => this.#groups.get(subscription)?.redrive(entries));
  }

  /**
   * Resolves when every running subscription (one with a consumer that is not stopped) has nothing left:
   * no message queued, in flight or waiting for a retry. What handlers publish meanwhile is waited for
   * too, so after `await backbone.drain()` a whole cascade of handlers has run. Rejects with a TIMEOUT
   * error naming what is left after `timeoutMs` (default `drainTimeoutMs`): a handler that keeps
   * retrying, or long retry delays. Open transactions are not waited for: they have published nothing yet.
   */
  drain(options: DrainOptions = {}): Promise<void> {
    const problems = new OptionProblems('drain()');
    problems.integer('timeoutMs', options.timeoutMs, 0);
    problems.throwIfAny();
    if (this.#idle()) return Promise.resolve();
    const timeoutMs = options.timeoutMs ?? this.#drainTimeoutMs;
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, timer: undefined };
      if (timeoutMs > 0) {
        waiter.timer = setTimeout(() => {
          this.#waiters.delete(waiter);
          const busy = [...this.#groups.values()].filter((group) => group.running && group.outstanding > 0);
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

  /**
   * Consumers must be stopped first (bus.stop() does). Nothing is dropped: several buses may share one
   * memory backbone (that is how services talk through it), and a new bus on it continues where the
   * subscriptions left off. Retry timers are paused while a subscription has no running consumer.
   */
  async close(): Promise<void> {}

  #finish(tx: MemoryTransaction, commit: boolean): void {
    const { messages, hooks } = finish(tx, commit);
    if (messages.length > 0) this.#commit(messages);
    for (const hook of hooks) {
      try {
        hook();
      } catch (error) {
        this.#warn('An onCommit hook of a memory transaction threw; the transaction stays committed', error);
      }
    }
  }

  /** Appends to the log in commit order and hands each message to the subscriptions of its topic. */
  #commit(messages: readonly Outgoing[]): void {
    for (const { envelope, json, keyHash } of messages) {
      const stored: Stored = { seq: ++this.#seq, envelope, json, keyHash };
      if (this.#maxLog > 0) {
        this.#log.push(stored);
        if (this.#log.length > this.#maxLog) {
          this.#log.shift();
          this.#forgotten++;
        }
      } else {
        this.#forgotten++;
      }
      const groups = this.#byTopic.get(envelope.topic);
      if (groups !== undefined) for (const group of groups) group.enqueue(stored);
      for (const group of this.#everyTopic) group.enqueue(stored);
    }
  }

  #replayLog(group: Group): void {
    if (this.#forgotten > 0) {
      this.#warn(
        `Subscription ${group.name} starts from the beginning, but the memory backbone has forgotten its ${this.#forgotten} oldest message${this.#forgotten === 1 ? '' : 's'} (it keeps maxLog = ${this.#maxLog}); it starts at the oldest kept`,
      );
    }
    const every = group.topics.includes(EVERY_TOPIC);
    const topics = new Set(group.topics);
    for (const stored of this.#log) if (every || topics.has(stored.envelope.topic)) group.enqueue(stored);
  }

  #index(): void {
    this.#byTopic.clear();
    this.#everyTopic = [];
    for (const group of this.#groups.values()) {
      if (group.topics.includes(EVERY_TOPIC)) {
        this.#everyTopic.push(group);
        continue;
      }
      for (const topic of new Set(group.topics)) {
        const list = this.#byTopic.get(topic);
        if (list === undefined) this.#byTopic.set(topic, [group]);
        else list.push(group);
      }
    }
  }

  #idle(): boolean {
    for (const group of this.#groups.values()) if (group.running && group.outstanding > 0) return false;
    return true;
  }

  #checkIdle(): void {
    if (this.#waiters.size === 0 || !this.#idle()) return;
    const waiters = [...this.#waiters];
    this.#waiters.clear();
    for (const waiter of waiters) {
      clearTimeout(waiter.timer);
      waiter.resolve();
    }
  }
}

/** The in-memory backbone: `createBus({ service, backbone: memory() })`, then `await backbone.drain()` in tests. */
export function memory(options?: MemoryOptions): MemoryBackbone {
  return new MemoryBackbone(options);
}
