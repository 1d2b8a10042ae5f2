import { hostname } from 'node:os';
import { EVERY_TOPIC, type SubscriptionSpec } from '../../core/backbone.ts';
import { TidingsError } from '../../core/errors.ts';
import type { ConsumerContext } from './context.ts';
import { type AcquiredCursor, acquiredLane, type Lane } from './lanes.ts';
import type { Gate } from './scopes.ts';

/** SQLSTATE the acknowledgement raises when a lease was lost (migration 004). */
const LEASE_LOST = 'TDL01';
/** SQLSTATE the acknowledgement raises when the subscription gained a topic this worker cannot handle (migration 005). */
const TOPICS_CHANGED = 'TDL02';

export class LeaseLost extends Error {
  override name = 'LeaseLost';
}

export class TopicsChanged extends Error {
  override name = 'TopicsChanged';
}

/** An acknowledgement's fence failure as the error the loop deals with; any other error as it is. */
export function fenceError(error: unknown): unknown {
  const code = (error as { code?: unknown }).code;
  return code === LEASE_LOST ? new LeaseLost() : code === TOPICS_CHANGED ? new TopicsChanged() : error;
}

/** A live worker of the subscription, as the heartbeat reads it; `topics` null for a worker of an older version. */
interface WorkerTopics {
  readonly id: string;
  readonly topics: readonly string[] | null;
}

/** What the leases need of the consumer they serve. */
interface LeaseHooks {
  /** Held while a batch runs: lanes change only between batches. */
  readonly batchGate: Gate;
  /** Resolves once the acknowledgement in flight, if any, has settled (a failed one is the loop's to deal with). */
  settledAck(): Promise<void>;
  /** Lanes were acquired: there may be messages to read, and held keys to learn. */
  acquired(): void;
  /** A lane was dropped: the held keys known are no longer those of the lanes held. */
  dropped(): void;
  stopping(): boolean;
}

/**
 * This worker's partitions of one subscription: its registration, the leases it holds (its lanes), renewed
 * on every heartbeat, and the balance with the other live workers (each takes ceil(partitions / workers)).
 * A worker killed with -9 stops renewing; its partitions are free once their lease expires.
 */
export class Leases {
  readonly owner = `${hostname()}:${process.pid}:${Math.random().toString(36).slice(2, 10)}`;
  /** The partitions this worker holds, with where each has read to. */
  readonly lanes = new Map<number, Lane>();
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #hooks: LeaseHooks;
  /** When workers expired long ago were last forgotten (see #rebalance). */
  #forgotAt = 0;
  /** The last disagreement on topics this worker warned about (see #agree), so it warns once per change. */
  #disagreement = '';
  #timer: NodeJS.Timeout | undefined;
  #beating: Promise<void> | undefined;
  #rebalancing: Promise<void> | undefined;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec, hooks: LeaseHooks) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#hooks = hooks;
  }

  /** Creates the subscription if it is new (refusing a changed partition count), and registers this worker. */
  async register(): Promise<void> {
    const { driver, sql, settings } = this.#ctx;
    const spec = this.#spec;
    this.#ctx.workers.add(this.owner);
    await driver.transaction(async (tx) => {
      const { rows } = await tx.query<{ partitions: number }>(sql.upsertSubscription, [spec.name, spec.topics, spec.partitions]);
      const stored = rows[0]?.partitions ?? (await tx.query<{ partitions: number }>(sql.subscriptionPartitions, [spec.name])).rows[0]?.partitions;
      if (stored !== undefined && stored !== spec.partitions) {
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Subscription ${spec.name} exists with ${stored} partitions, not ${spec.partitions}: changing the count would break per-key order. Keep partitions: ${stored}, or use a new subscription name`,
        );
      }
      for (const command of spec.commands ?? []) {
        await tx.query(sql.commandLock, [command]);
        const { rows: owner } = await tx.query<{ name: string }>(sql.commandOwner, [command, spec.name]);
        if (owner[0] !== undefined) {
          throw new TidingsError(
            'SUBSCRIPTION_CONFLICT',
            `Command ${command} is handled by subscription ${owner[0].name} already; subscription ${spec.name} cannot take it too: a command has one owner (send delivers it once). Handle it in ${owner[0].name}, or, if that subscription is gone for good, drop it: tidings subscriptions drop ${owner[0].name}`,
          );
        }
      }
      await tx.query(sql.createCursors, [spec.name, spec.partitions, spec.startFrom === 'beginning']);
      await tx.query(sql.registerWorker, [this.owner, spec.name, hostname(), process.pid, settings.leaseMs, spec.topics]);
      // From its commit, an acknowledgement of a worker without one of these topics fails (TDL02).
      await tx.query(sql.settleTopics, [spec.name]);
    });
  }

  /** The first heartbeat (its lanes acquired before it resolves, if any are free), then one every `heartbeatMs`. */
  async start(): Promise<void> {
    await this.#heartbeat();
    this.#timer = setInterval(() => this.beat(), this.#ctx.settings.heartbeatMs);
  }

  /** A heartbeat now, unless one runs already. */
  beat(): void {
    this.#beating ??= this.#heartbeat()
      .catch((error: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: heartbeat failed; retrying`, error))
      .finally(() => {
        this.#beating = undefined;
      });
  }

  /** Stops renewing; waits for a heartbeat or rebalance in progress. */
  async stop(): Promise<void> {
    clearInterval(this.#timer);
    await this.#beating?.catch(() => undefined);
    await this.#rebalancing;
  }

  /** Gives every lane back and unregisters this worker, so others take over at once rather than on expiry. */
  async unregister(): Promise<void> {
    const { driver, sql } = this.#ctx;
    try {
      await this.release([...this.lanes.keys()]);
      await driver.query(sql.unregisterWorker, [this.owner]);
      // A topic only this worker handled is no longer the subscription's, unless the newest worker has it.
      await driver.query(sql.settleTopics, [this.#spec.name]);
      this.#ctx.workers.delete(this.owner);
    } catch (error) {
      // The leases expire by themselves; another worker takes over then.
      this.#ctx.warn(`Subscription ${this.#spec.name}: could not release leases on stop; they expire in ${this.#ctx.settings.leaseMs} ms`, error);
    }
  }

  /** Gives partitions back at once, so another worker takes them without waiting for the leases to expire. */
  async release(partitions: readonly number[]): Promise<void> {
    for (const partition of partitions) {
      this.#drop(partition);
      await this.#ctx.driver.query(this.#ctx.sql.release, [this.#spec.name, partition, this.owner]);
    }
  }

  #drop(partition: number): void {
    this.lanes.delete(partition);
    this.#hooks.dropped();
  }

  /**
   * Renews this worker and its leases, then rebalances. Renewal never waits for a batch, so a long batch
   * keeps its leases; rebalancing changes lanes only between batches, and runs in the background so the
   * next renewal is not held up by it.
   */
  async #heartbeat(): Promise<void> {
    if (this.#hooks.stopping()) return;
    const { driver, sql, settings } = this.#ctx;
    const { rows } = await driver.query<{ workers: WorkerTopics[]; topics: string[] | null; mine: Array<{ partition: number; epoch: string }> }>(
      sql.heartbeat,
      [this.owner, this.#spec.name, settings.leaseMs],
    );
    const live = this.#agree(rows[0]?.topics ?? [], rows[0]?.workers ?? []);
    const mine = new Map((rows[0]?.mine ?? []).map((entry) => [entry.partition, String(entry.epoch)]));
    this.#rebalancing ??= this.#rebalance(live, mine)
      .catch((error: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: rebalancing failed; retrying`, error))
      .finally(() => {
        this.#rebalancing = undefined;
      });
    if (this.lanes.size === 0) await this.#rebalancing;
  }

  /**
   * How many live workers may hold partitions: those that handle every topic of the subscription (0 if this
   * worker does not; then it holds none). A worker without a handler for one of the subscription's topics
   * would skip its messages: during a rolling deploy that adds a handler, the old workers hand their
   * partitions to the new ones; one that removes a handler waits for the old ones to stop. Warns, once per
   * change, naming the topics and the workers that disagree; see test/conformance/deploy.ts.
   */
  #agree(topics: readonly string[], workers: readonly WorkerTopics[]): number {
    const handles = (own: readonly string[] | null) => own === null || own.includes(EVERY_TOPIC) || topics.every((topic) => own.includes(topic));
    const able = workers.filter((worker) => handles(worker.topics));
    const me = handles(this.#spec.topics);
    const unable = workers.filter((worker) => !handles(worker.topics));
    const disagreement = unable.length === 0 ? '' : JSON.stringify([topics, unable.map((worker) => worker.id), me]);
    if (disagreement !== this.#disagreement) {
      this.#disagreement = disagreement;
      if (disagreement !== '') this.#ctx.warn(describeDisagreement(this.#spec.name, this.owner, topics, unable, able));
      else this.#ctx.warn(`Subscription ${this.#spec.name}: its workers agree on its topics again (${topics.join(', ')})`);
    }
    return me ? Math.max(1, able.length) : 0;
  }

  async #rebalance(live: number, mine: ReadonlyMap<number, string>): Promise<void> {
    const { driver, sql, settings } = this.#ctx;
    const spec = this.#spec;
    const release = await this.#hooks.batchGate.acquire();
    try {
      if (this.#hooks.stopping()) return;
      // Lanes change only once the last acknowledgement has settled (a failed one is dealt with by the loop).
      await this.#hooks.settledAck();
      // A lane whose lease we no longer hold (expired during a pause, taken over) is dropped at once; a
      // batch still running for it is refused by the epoch fence when it acknowledges.
      for (const [partition, lane] of this.lanes) {
        if (mine.get(partition) === lane.epoch) continue;
        this.#drop(partition);
        const detail = `the lease of partition ${partition} expired or was taken over`;
        this.#ctx.observer?.emit('lease:lost', { subscription: spec.name, backbone: 'postgres', detail });
      }
      const target = live === 0 ? 0 : Math.ceil(spec.partitions / live);
      if (this.lanes.size < target) {
        const { rows: acquired } = await driver.query<AcquiredCursor>(sql.acquire, [this.owner, spec.name, settings.leaseMs, target - this.lanes.size]);
        for (const row of acquired) this.lanes.set(row.partition, acquiredLane(spec, row));
        if (acquired.length > 0) this.#hooks.acquired();
      } else if (this.lanes.size > target) {
        await this.release([...this.lanes.keys()].sort((a, b) => b - a).slice(0, this.lanes.size - target));
      }
      // Workers gone for an hour are forgotten; once a minute is often enough (every heartbeat was a third
      // of an idle consumer's queries).
      if (Date.now() - this.#forgotAt > 60_000) {
        await driver.query(sql.forgetExpiredWorkers, [spec.name]);
        this.#forgotAt = Date.now();
      }
    } finally {
      release();
    }
  }
}

function describeDisagreement(
  subscription: string,
  self: string,
  topics: readonly string[],
  unable: readonly WorkerTopics[],
  able: readonly WorkerTopics[],
): string {
  const name = (worker: WorkerTopics) => (worker.id === self ? 'this worker' : worker.id);
  const lacking = (worker: WorkerTopics) => topics.filter((topic) => !worker.topics!.includes(topic));
  const list = unable.map((worker) => `${name(worker)} (no handler for ${lacking(worker).join(', ')})`).join('; ');
  const fate =
    able.length === 0
      ? 'No live worker handles all of them, so every partition is held: nothing is skipped, and lag grows until one does'
      : `Their partitions go to the workers that handle all of them (${able.map(name).join(', ')})`;
  const hint =
    "During a rolling deploy that adds or removes a handler this lasts until the old version's workers stop; otherwise give every worker of the subscription the same handlers";
  return `Subscription ${subscription}: its workers disagree on its topics (${topics.join(', ')}): ${list}. ${fate}. ${hint}`;
}
