/**
 * What a schema's subscriptions are doing, read from outside them (`tidings status`, a console, a health
 * check): per subscription its cursors and leases, lag and the age of its oldest unhandled message, held
 * keys, dead letters, and its workers with the topics they handle.
 */
import { iso } from '../codec.ts';
import type { Queryable } from '../connection/driver.ts';
import { statusStatements } from '../sql/status.ts';
import { explainMissingSchema, unknownSubscription } from './schema.ts';

export interface PartitionStatus {
  readonly partition: number;
  /** The worker holding the lease, or null when no one does. */
  readonly owner: string | null;
  /** Bumped at every change of owner; a bigint in the table, far below 2^53 in practice. */
  readonly epoch: number;
  readonly leaseExpiresAt: string | null;
  /** Time left on the lease by the database's clock; negative once expired, null without a lease. */
  readonly leaseRemainingMs: number | null;
  readonly handled: number;
  /** Messages of this partition's topics and keys committed but not yet handled. */
  readonly lag: number;
  /** Age of the oldest of them (by publication time), null when there is none. */
  readonly oldestUnprocessedAgeMs: number | null;
  readonly updatedAt: string;
  /**
   * Tenants read from a cursor of their own (fair delivery: each took more than its share of a read, and its
   * backlog is read beside the others' messages, docs/tenancy.md); usually the noisy ones.
   */
  readonly readApart: string[];
}

export interface WorkerStatus {
  readonly id: string;
  readonly subscription: string;
  readonly host: string;
  readonly pid: number;
  readonly startedAt: string;
  readonly expiresAt: string;
  readonly live: boolean;
  /** The topics it has handlers for; null for a worker of a version that did not record them. */
  readonly topics: string[] | null;
}

/** A live worker without a handler for some of its subscription's topics: it holds no partition meanwhile. */
export interface TopicDisagreement {
  readonly worker: string;
  readonly missing: string[];
}

export interface SubscriptionStatus {
  readonly name: string;
  readonly topics: string[];
  readonly partitions: number;
  readonly handled: number;
  readonly lag: number;
  readonly oldestUnprocessedAgeMs: number | null;
  /** Keys waiting for a retry (or a redrive) and the messages queued behind them. */
  readonly heldKeys: number;
  readonly heldMessages: number;
  readonly deadLetters: number;
  readonly cursors: PartitionStatus[];
  /** The tenants any of its partitions reads apart (see PartitionStatus.readApart). */
  readonly readApart: string[];
  readonly workers: WorkerStatus[];
  /**
   * Live workers that lack a handler for some of the subscription's topics (a rolling deploy that adds or
   * removes one): they hold no partition, and the partitions go to workers that handle every topic.
   */
  readonly disagreements: TopicDisagreement[];
}

export interface Status {
  readonly schema: string;
  /** The database's clock when the status was read. */
  readonly at: string;
  readonly subscriptions: SubscriptionStatus[];
  readonly workers: WorkerStatus[];
  readonly heldKeys: number;
  readonly deadLetters: number;
}

export interface StatusOptions {
  readonly schema: string;
  /** Only this subscription. */
  readonly subscription?: string | undefined;
}

export async function readStatus(db: Queryable, options: StatusOptions): Promise<Status> {
  const sql = statusStatements(options.schema);
  const only = options.subscription ?? null;
  return explainMissingSchema(options.schema, async () => {
    const [clock, subscriptions, cursors, workers, held, dead] = await Promise.all([
      db.query<{ at: Date | string }>(sql.now),
      db.query<{ name: string; topics: string[]; partitions: number }>(sql.subscriptions, [only]),
      db.query<{
        subscription: string;
        partition: number;
        owner: string | null;
        epoch: string;
        lease_expires_at: Date | string | null;
        lease_remaining_ms: number | string | null;
        handled: string | number;
        lag: string | number;
        oldest_ms: number | string | null;
        updated_at: Date | string;
        read_apart: string[];
      }>(sql.cursors, [only]),
      db.query<{
        id: string;
        subscription: string;
        host: string;
        pid: number;
        started_at: Date | string;
        expires_at: Date | string;
        live: boolean;
        topics: string[] | null;
      }>(sql.workers, [only]),
      db.query<{ subscription: string; keys: string | number; messages: string | number }>(sql.held, [only]),
      db.query<{ subscription: string; count: string | number }>(sql.deadLetters, [only]),
    ]);
    if (only !== null && subscriptions.rows.length === 0) throw await unknownSubscription(db, options.schema, only);
    const allWorkers: WorkerStatus[] = workers.rows.map((row) => ({
      id: row.id,
      subscription: row.subscription,
      host: row.host,
      pid: Number(row.pid),
      startedAt: iso(row.started_at),
      expiresAt: iso(row.expires_at),
      live: row.live,
      topics: row.topics,
    }));
    const heldBy = new Map(held.rows.map((row) => [row.subscription, { keys: Number(row.keys), messages: Number(row.messages) }]));
    const deadBy = new Map(dead.rows.map((row) => [row.subscription, Number(row.count)]));
    const result: SubscriptionStatus[] = subscriptions.rows.map((sub) => {
      const own = cursors.rows
        .filter((row) => row.subscription === sub.name)
        .map(
          (row): PartitionStatus => ({
            partition: Number(row.partition),
            owner: row.owner,
            epoch: Number(row.epoch),
            leaseExpiresAt: row.lease_expires_at === null ? null : iso(row.lease_expires_at),
            leaseRemainingMs: row.lease_remaining_ms === null ? null : Math.round(Number(row.lease_remaining_ms)),
            handled: Number(row.handled),
            lag: Number(row.lag),
            // Publication times come from the publishers' clocks: never report a negative age.
            oldestUnprocessedAgeMs: row.oldest_ms === null ? null : Math.max(0, Math.round(Number(row.oldest_ms))),
            updatedAt: iso(row.updated_at),
            readApart: row.read_apart,
          }),
        );
      const ages = own.map((cursor) => cursor.oldestUnprocessedAgeMs).filter((age): age is number => age !== null);
      return {
        name: sub.name,
        topics: sub.topics,
        partitions: Number(sub.partitions),
        handled: own.reduce((sum, cursor) => sum + cursor.handled, 0),
        lag: own.reduce((sum, cursor) => sum + cursor.lag, 0),
        oldestUnprocessedAgeMs: ages.length === 0 ? null : Math.max(...ages),
        heldKeys: heldBy.get(sub.name)?.keys ?? 0,
        heldMessages: heldBy.get(sub.name)?.messages ?? 0,
        deadLetters: deadBy.get(sub.name) ?? 0,
        cursors: own,
        readApart: [...new Set(own.flatMap((cursor) => cursor.readApart))].sort(),
        workers: allWorkers.filter((worker) => worker.subscription === sub.name),
        disagreements: allWorkers
          .filter((worker) => worker.subscription === sub.name && worker.live && worker.topics !== null && !worker.topics.includes('*'))
          .map((worker) => ({ worker: worker.id, missing: sub.topics.filter((topic) => !worker.topics!.includes(topic)) }))
          .filter((entry) => entry.missing.length > 0),
      };
    });
    return {
      schema: options.schema,
      at: iso(clock.rows[0]!.at),
      subscriptions: result,
      workers: allWorkers,
      heldKeys: [...heldBy.values()].reduce((sum, entry) => sum + entry.keys, 0),
      deadLetters: [...deadBy.values()].reduce((sum, count) => sum + count, 0),
    };
  });
}
