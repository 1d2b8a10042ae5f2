/**
 * The memory backbone: Tidings in one process, with no server, for unit tests of handlers and quick
 * examples. It keeps PostgreSQL's semantics where they apply: transactional publish, commit order,
 * subscriptions as consumer groups with partitioned lanes, per-key order, retries that hold only their
 * key, dead letters with their history and redrive, an inbox per subscription, graceful stop. Nothing is
 * durable: the state lives as long as the backbone object. docs/memory.md describes it.
 */
import { defaultWarning } from '../core/warnings.ts';
import { systemClock, type Clock, type ClockTimer } from '../core/clock.ts';
import type { Envelope } from '../core/envelope.ts';
import { EVERY_TOPIC, type Backbone, type Consumer, type DeliveryHandler, type Outgoing, type Reply, type SubscriptionSpec } from '../core/backbone.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import type { SagaRow, SagaStore } from '../core/saga.ts';
import { TidingsError } from '../core/errors.ts';
import { OptionProblems, optionNames } from '../core/options.ts';
import { DeadLetterBook } from './dead-letters.ts';
import { Deque } from './deque.ts';
import { Group, MemoryWorker, type GroupContext, type Stored } from './subscription.ts';
import { enlist, finish, MemoryTransaction, rollbackHook } from './transaction.ts';

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
  /** The clock of retries and scheduled messages: the system's, or a virtual one (tidings/testing). */
  clock?: Clock;
}

export const memoryDefaults = {
  maxLog: 100_000,
  maxInbox: 100_000,
  maxDeadLetters: 100_000,
  drainTimeoutMs: 10_000,
} as const satisfies Required<Omit<MemoryOptions, 'onWarning' | 'clock'>>;

export interface DrainOptions {
  /** Reject with a TIMEOUT error after this long (default `drainTimeoutMs`); 0 waits for ever. */
  timeoutMs?: number;
  /**
   * Wait for keys that wait for a delayed retry too (default true). False resolves once nothing can run
   * now: what a test with a virtual clock waits for before it moves the clock (tidings/testing).
   */
  retries?: boolean;
}

interface Waiter {
  /** Also waits for keys that wait for a retry. */
  readonly retries: boolean;
  resolve(): void;
  reject(error: unknown): void;
  timer: NodeJS.Timeout | undefined;
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
  readonly #clock: Clock;
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
  /** Saga instances by [saga, id], and the instances locked by a transaction in progress (see sagas). */
  readonly #sagas = new Map<string, SagaRow>();
  readonly #sagaLocks = new Map<string, Promise<void>>();
  /** The requests waited for, by id (see awaitReply). */
  readonly #awaiting = new Map<string, { resolve: (reply: Reply) => void; late: () => void; gone?: boolean }>();
  /** The last tick each recurring schedule fired (see claimTick). */
  readonly #ticks = new Map<string, { tick: number; definition: string }>();
  /** Messages scheduled for later, by id, waiting in their timers. */
  readonly #scheduled = new Map<string, ClockTimer>();
  readonly #ctx: GroupContext;

  constructor(options: MemoryOptions = {}) {
    const problems = new OptionProblems('memory()');
    problems.unknownKeys(options, optionNames<MemoryOptions>()('maxLog', 'maxInbox', 'maxDeadLetters', 'drainTimeoutMs', 'onWarning', 'clock'));
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
    this.#clock = options.clock ?? systemClock;
    this.#deadLetters = new DeadLetterBook(options.maxDeadLetters ?? memoryDefaults.maxDeadLetters, (message) => this.#warn(message));
    this.#ctx = {
      begin: (what) => new MemoryTransaction(this, what),
      end: (tx, commit) => this.#finish(tx, commit),
      deadLetter: (subscription, entry, reason) => this.#deadLetters.add(subscription, entry, reason),
      settled: () => this.#checkIdle(),
      retopic: () => this.#index(),
      warn: (message, error) => this.#warn(message, error),
      maxInbox: this.#maxInbox,
      clock: this.#clock,
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
    for (const command of spec.commands ?? []) {
      const owner = [...this.#groups.values()].find((other) => other.name !== spec.name && other.topics.includes(command));
      if (owner !== undefined) {
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Command ${command} is handled by subscription ${owner.name} already; subscription ${spec.name} cannot take it too: a command has one owner (send delivers it once). Handle it in ${owner.name}`,
        );
      }
    }
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
   * The committed messages still kept (`maxLog`), oldest first, each with its own copy of the data as JSON
   * carried it; only those of `topic` if given. What a test reads to see what was published.
   */
  messages(topic?: string): Envelope[] {
    const found: Envelope[] = [];
    for (const stored of this.#log) {
      if (topic === undefined || stored.envelope.topic === topic) found.push({ ...stored.envelope, data: JSON.parse(stored.json) as unknown });
    }
    return found;
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
    const retries = options.retries ?? true;
    if (this.#idle(retries)) return Promise.resolve();
    const timeoutMs = options.timeoutMs ?? this.#drainTimeoutMs;
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = { retries, resolve, reject, timer: undefined };
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

  /**
   * Saga instances in this object. Loading one locks it until the loading transaction ends, as PostgreSQL's
   * row lock does, so two transitions of one instance never interleave; a save applies at commit.
   */
  sagas(): SagaStore<MemoryTransaction> {
    const instances = this.#sagas;
    const locks = this.#sagaLocks;
    return {
      async load(tx, saga, id) {
        const name = JSON.stringify([saga, id]);
        while (locks.has(name)) await locks.get(name);
        let release!: () => void;
        locks.set(name, new Promise<void>((resolve) => (release = resolve)));
        const unlock = () => {
          locks.delete(name);
          release();
        };
        tx.onCommit(unlock);
        rollbackHook(tx, unlock);
        return instances.get(name);
      },
      async find(saga, id) {
        return instances.get(JSON.stringify([saga, id]));
      },
      async save(tx, saga, id, row) {
        const name = JSON.stringify([saga, id]);
        if ((instances.get(name)?.version ?? 0) !== row.version - 1) return false;
        const copy = { ...row, state: JSON.parse(JSON.stringify(row.state)) as unknown };
        tx.onCommit(() => instances.set(name, copy));
        return true;
      },
    };
  }

  /** Records a request's answer: with `tx`, when it commits (so it exists iff the request is acknowledged). */
  async reply(requestId: string, reply: Reply, tx?: MemoryTransaction): Promise<void> {
    // As JSON carries it, like every message here.
    const copy: Reply = reply.data === undefined ? reply : { data: JSON.parse(JSON.stringify(reply.data)) as unknown };
    // Nobody waits for the answer to a command sent without request: it is dropped (the first answer stands).
    const deliver = () => {
      const waiting = this.#awaiting.get(requestId);
      if (waiting === undefined) return;
      this.#awaiting.delete(requestId);
      if (waiting.gone === true) waiting.late();
      else waiting.resolve(copy);
    };
    if (tx === undefined) deliver();
    else tx.onCommit(deliver);
  }

  async awaitReply(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      this.#awaiting.set(requestId, { resolve, late });
      signal.addEventListener(
        'abort',
        () => {
          const waiting = this.#awaiting.get(requestId);
          if (waiting !== undefined) this.#awaiting.set(requestId, { ...waiting, gone: true });
          reject(signal.reason);
          // An answer may still come within a minute: then it is counted as late.
          setTimeout(() => {
            if (this.#awaiting.get(requestId)?.gone === true) this.#awaiting.delete(requestId);
          }, 60_000).unref();
        },
        { once: true },
      );
    });
  }

  /** One process is every process here: the last tick of each schedule is kept in this object. */
  async claimTick(name: string, definition: string, tick: number, tx: MemoryTransaction): Promise<boolean> {
    const last = this.#ticks.get(name);
    if (last !== undefined && last.tick >= tick) return false;
    const previous = last;
    this.#ticks.set(name, { tick, definition });
    // Claimed with the transaction: undone if it rolls back, as the tick's message is.
    rollbackHook(tx, () => {
      if (this.#ticks.get(name)?.tick === tick) {
        if (previous === undefined) this.#ticks.delete(name);
        else this.#ticks.set(name, previous);
      }
    });
    return true;
  }

  async lastTick(name: string): Promise<{ tick: number; definition: string } | undefined> {
    return this.#ticks.get(name);
  }

  /**
   * Cancels a scheduled message not yet due: true if it was waiting. Memory keeps scheduled messages in
   * timers, as long as the backbone object lives (a stopped process forgets them: nothing is durable here).
   */
  async cancelScheduled(id: string): Promise<boolean> {
    const waiting = this.#scheduled.get(id);
    if (waiting === undefined) return false;
    this.#clock.clearTimeout(waiting);
    this.#scheduled.delete(id);
    return true;
  }

  /**
   * Appends to the log in commit order and hands each message to the subscriptions of its topic. A message
   * due later waits in a timer and is committed then, entering its key's order at its due time.
   */
  #commit(messages: readonly Outgoing[]): void {
    for (const message of messages) {
      if (message.dueAt !== undefined && message.dueAt > this.#clock.now()) this.#later(message);
      else this.#append(message);
    }
  }

  #later(message: Outgoing): void {
    const { id } = message.envelope;
    // The same id scheduled twice (a retried publish) is one message, as on PostgreSQL.
    if (this.#scheduled.has(id)) return;
    const timer = this.#clock.setTimeout(() => {
      this.#scheduled.delete(id);
      this.#append(message);
    }, message.dueAt! - this.#clock.now());
    // A scheduled message must not keep a test process alive.
    timer.unref?.();
    this.#scheduled.set(id, timer);
  }

  #append({ envelope, json, keyHash }: Outgoing): void {
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

  #idle(retries: boolean): boolean {
    for (const group of this.#groups.values()) if (group.running && (retries ? group.outstanding : group.outstanding - group.waiting) > 0) return false;
    return true;
  }

  #checkIdle(): void {
    if (this.#waiters.size === 0) return;
    for (const waiter of [...this.#waiters]) {
      if (!this.#idle(waiter.retries)) continue;
      this.#waiters.delete(waiter);
      clearTimeout(waiter.timer);
      waiter.resolve();
    }
  }
}

/** The in-memory backbone: `createBus({ service, backbone: memory() })`, then `await backbone.drain()` in tests. */
export function memory(options?: MemoryOptions): MemoryBackbone {
  return new MemoryBackbone(options);
}
