/**
 * The memory backbone: Tidings in one process, with no server, for unit tests of handlers and quick
 * examples. It keeps PostgreSQL's semantics where they apply: transactional publish, commit order,
 * subscriptions as consumer groups with partitioned lanes, per-key order, retries that hold only their
 * key, dead letters with their history and redrive, an inbox per subscription, graceful stop. Nothing is
 * durable: the state lives as long as the backbone object. docs/memory.md describes it.
 */
import type { Backbone, Consumer, DeliveryHandler, Outgoing, Reply, SubscriptionSpec } from '../core/backbone.ts';
import type { AnyContract } from '../core/contract.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import type { Envelope } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import { LocalTokenBuckets, TenantQuotas } from '../core/quotas.ts';
import type { SagaStore } from '../core/saga.ts';
import { Group } from './consume/group.ts';
import type { GroupContext } from './consume/state.ts';
import { MemoryWorker } from './consume/worker.ts';
import { DeadLetterBook } from './dead-letters.ts';
import { Drains } from './drain.ts';
import { resolveMemoryOptions, type DrainOptions, type MemoryOptions, type MemorySettings } from './options.ts';
import { MemoryPublisher } from './publisher.ts';
import { MemoryReplies } from './replies.ts';
import { memorySagaStore } from './sagas.ts';
import { enlist, finish, MemoryTransaction, rollbackHook } from './transaction.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';

/**
 * Publishing appends to one log in commit order and copies a reference into the queue of each
 * subscription of the topic, by lane and key (publisher.ts); workers take ready keys from their lanes
 * (consume/). Every step is O(1) per message, so a test suite can push 100k messages through it.
 */
export class MemoryBackbone implements Backbone<MemoryTransaction> {
  readonly name = 'memory';
  readonly #settings: MemorySettings;
  readonly #publisher: MemoryPublisher;
  readonly #groups = new Map<string, Group>();
  readonly #deadLetters: DeadLetterBook;
  readonly #drains: Drains;
  readonly #sagas = memorySagaStore();
  readonly #replies = new MemoryReplies();
  /** The last tick each recurring schedule fired (see claimTick). */
  readonly #ticks = new Map<string, { tick: number; definition: string }>();
  readonly #ctx: GroupContext;
  /** The tenants' publish budgets (`tenancy.quotas`); they outlive a close, like the rest of the state. */
  readonly #buckets: LocalTokenBuckets;
  #quotas: TenantQuotas | undefined;
  /** The telemetry of the bus that last opened on this backbone (several may share one): its receive spans. */
  #observer: BackboneObserver | undefined;

  constructor(options: MemoryOptions = {}) {
    const settings = resolveMemoryOptions(options);
    this.#settings = settings;
    this.#publisher = new MemoryPublisher(settings);
    this.#deadLetters = new DeadLetterBook(settings.maxDeadLetters, (message) => settings.warn(message));
    this.#drains = new Drains(() => this.#groups.values(), settings.drainTimeoutMs);
    this.#buckets = new LocalTokenBuckets(() => settings.clock.now());
    this.#quotas = this.#newQuotas();
    this.#ctx = {
      begin: (what) => new MemoryTransaction(this, what),
      end: (tx, commit) => this.#finish(tx, commit),
      deadLetter: (subscription, entry, reason) => this.#deadLetters.add(subscription, entry, reason),
      settled: () => this.#drains.check(),
      retopic: () => this.#publisher.route(this.#groups.values()),
      warn: (message, error) => settings.warn(message, error),
      maxInbox: settings.maxInbox,
      clock: settings.clock,
      observer: () => this.#observer,
    };
  }

  observe(observer: BackboneObserver): void {
    this.#observer = observer;
  }

  /** Nothing to connect to. The state lives in this object, so it may be opened again after close(). */
  async open(): Promise<void> {}

  /** Waits for or refuses (TENANT_RATE_LIMITED) a publish over its tenant's quota (`tenancy.quotas`, see Backbone.admit). */
  async admit(tenant: string, contract: AnyContract, count: number): Promise<void> {
    await this.#quotas?.admit(tenant, contract, count);
  }

  /** Without `tx`, the messages are committed when this resolves; with it, when that transaction commits. */
  async publish(messages: readonly Outgoing[], tx?: MemoryTransaction): Promise<void> {
    if (tx !== undefined) {
      enlist(tx, this, messages);
      return;
    }
    this.#publisher.commit(messages);
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
      this.#publisher.route(this.#groups.values());
      if (spec.startFrom === 'beginning') this.#publisher.replay(group);
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
    return this.#publisher.messages(topic);
  }

  /**
   * Resolves when every running subscription (one with a consumer that is not stopped) has nothing left:
   * no message queued, in flight or waiting for a retry. What handlers publish meanwhile is waited for
   * too, so after `await backbone.drain()` a whole cascade of handlers has run. Rejects with a TIMEOUT
   * error naming what is left after `timeoutMs` (default `drainTimeoutMs`): a handler that keeps
   * retrying, or long retry delays. Open transactions are not waited for: they have published nothing yet.
   */
  drain(options: DrainOptions = {}): Promise<void> {
    return this.#drains.drain(options);
  }

  /**
   * Consumers must be stopped first (bus.stop() does). Nothing is dropped: several buses may share one
   * memory backbone (that is how services talk through it), and a new bus on it continues where the
   * subscriptions left off. Retry timers are paused while a subscription has no running consumer.
   */
  async close(): Promise<void> {
    // Publishes still waiting for their tokens end with STOPPED; the buckets stay for a bus opened again.
    this.#quotas?.close();
    this.#quotas = this.#newQuotas();
  }

  #newQuotas(): TenantQuotas | undefined {
    const quotas = this.#settings.quotas;
    return quotas === undefined ? undefined : new TenantQuotas(quotas, this.#buckets, this.#settings.clock);
  }

  #finish(tx: MemoryTransaction, commit: boolean): void {
    const { messages, hooks } = finish(tx, commit);
    if (messages.length > 0) this.#publisher.commit(messages);
    for (const hook of hooks) {
      try {
        hook();
      } catch (error) {
        this.#settings.warn('An onCommit hook of a memory transaction threw; the transaction stays committed', error);
      }
    }
  }

  /**
   * Saga instances in this object. Loading one locks it until the loading transaction ends, as PostgreSQL's
   * row lock does, so two transitions of one instance never interleave; a save applies at commit.
   */
  sagas(): SagaStore<MemoryTransaction> {
    return this.#sagas;
  }

  /** Records a request's answer: with `tx`, when it commits (so it exists iff the request is acknowledged). */
  async reply(requestId: string, reply: Reply, tx?: MemoryTransaction): Promise<void> {
    this.#replies.reply(requestId, reply, tx);
  }

  awaitReply(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    return this.#replies.awaitReply(requestId, signal, late);
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
    return this.#publisher.cancel(id);
  }
}
