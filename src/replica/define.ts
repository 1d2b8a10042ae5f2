/**
 * Declaring a replica: its feeds (which events change which rows, and how), its options with their
 * defaults, and what it reports (staleness, drift checks, rebuilds, counts). replica.ts runs one.
 */
import { validateName, type AnyContract, type DataOf } from '../core/contract.ts';
import { OptionProblems, type SubscribeOptions } from '../core/options.ts';

/** How the events of one contract change the replica's rows. */
export interface Feed<Row, C extends AnyContract = AnyContract> {
  readonly contract: C;
  /** The row's key; defaults to the contract's partition key. */
  readonly key?: (data: DataOf<C>) => string;
  /** The source's version of the key after this event; defaults to `data.version`. */
  readonly version?: (data: DataOf<C>) => number;
  /**
   * The new row from the current one (undefined when there is none): for events that carry part of the
   * state. Return null to delete. Without `apply` or `delete`, the event's data is the row (`upsert`).
   */
  readonly apply?: (row: Row | undefined, data: DataOf<C>) => Row | null;
  /** The row this event carries whole; defaults to the event's data itself. */
  readonly upsert?: (data: DataOf<C>) => Row;
  /** This event deletes the key (a tombstone keeps its version). */
  readonly delete?: true;
}

/** Declares one feed; `Row` comes from the replica it is listed in. */
export function feed<Row, C extends AnyContract>(contract: C, spec: Omit<Feed<Row, C>, 'contract'> = {}): Feed<Row, C> {
  return { contract, ...spec };
}

export interface ReplicaDefinition<Row> {
  /** This replica's name (`credentials`): its tables and subscriptions are named after it. */
  readonly name: string;
  /** The source it copies (`identity.users`), as the owner declared it with defineSource. */
  readonly source: string;
  // biome-ignore lint/suspicious/noExplicitAny: each feed has its own contract
  readonly feeds: readonly Feed<Row, any>[];
  /** In-memory secondary indexes (with `memory: true`): `lookup(index, value)` finds a row by them. */
  readonly indexes?: Readonly<Record<string, (row: Row) => string>>;
}

export function defineReplica<Row>(definition: ReplicaDefinition<Row>): ReplicaDefinition<Row> {
  validateName('Replica', definition?.name);
  validateName('Source', definition.source);
  const problems = new OptionProblems(`defineReplica ${definition.name}`);
  problems.check(Array.isArray(definition.feeds) && definition.feeds.length > 0, 'feeds must list at least one contract');
  const topics = new Set<string>();
  for (const [i, f] of (definition.feeds ?? []).entries()) {
    problems.check(f?.contract?.topic !== undefined, `feeds[${i}].contract must be a contract (defineEvent)`);
    if (f?.contract?.topic === undefined) continue;
    problems.check(!topics.has(f.contract.topic), `feeds[${i}]: ${f.contract.topic} is listed twice`);
    topics.add(f.contract.topic);
    problems.check(f.key !== undefined || f.contract.key !== undefined, `feeds[${i}] (${f.contract.topic}): give key, or a key function on the contract`);
    problems.check(
      [f.apply, f.upsert, f.delete].filter((x) => x !== undefined).length <= 1,
      `feeds[${i}] (${f.contract.topic}): give at most one of apply, upsert and delete`,
    );
  }
  problems.throwIfAny();
  return Object.freeze({ ...definition });
}

export interface ReplicaOptions {
  /** Tells apart replicas of one definition in one database (one per gateway node): `credentials-<instance>`. */
  instance?: string;
  /** Keep every row in memory too: `get` and `lookup` answer without a query. One process per replica then. */
  memory?: boolean;
  /** How a new replica fills itself: replay the source's events from the start of the log, or a state transfer. */
  bootstrap?: 'replay' | 'transfer';
  /** A drift check runs this often once `start()` was called; 0 disables periodic checks. */
  driftCheckEveryMs?: number;
  /** A request to the source that gets no complete answer in this time fails with SOURCE_UNAVAILABLE. */
  requestTimeoutMs?: number;
  /** Tree nodes asked for per request message. */
  maxNodesPerRequest?: number;
  /** Keys (with their hashes) sent per request message when comparing leaves. */
  maxKeysPerRequest?: number;
  /** Rows asked for per page of a state transfer. */
  pageSize?: number;
  /** Options of the subscription that applies the feeds (its startFrom follows `bootstrap`). */
  subscription?: Omit<SubscribeOptions, 'startFrom'>;
  /** Problems the replica recovers from by itself (a failed periodic check). */
  onWarning?: (message: string, error?: unknown) => void;
}

export const replicaDefaults = {
  instance: undefined as string | undefined,
  memory: false,
  bootstrap: 'replay',
  driftCheckEveryMs: 10 * 60_000,
  requestTimeoutMs: 30_000,
  maxNodesPerRequest: 256,
  maxKeysPerRequest: 2_000,
  pageSize: 1_000,
  subscription: {} as Omit<SubscribeOptions, 'startFrom'>,
  onWarning: undefined as ((message: string, error?: unknown) => void) | undefined,
} satisfies Record<keyof ReplicaOptions, unknown>;

export interface Staleness {
  /** Source events committed but not yet applied (the feed subscription's lag). */
  readonly lag: number;
  /** Publication time of the newest event applied, null before the first. */
  readonly newestEventAt: Date | null;
  /** Age of that event now; with lag 0 the replica is current however old it is. */
  readonly ageMs: number | null;
}

export interface DriftReport {
  readonly checkId: string;
  readonly replica: string;
  readonly at: string;
  readonly durationMs: number;
  /** Keys the source has and the replica lacks. */
  readonly missing: number;
  /** Keys the replica has and the source does not. */
  readonly extra: number;
  /** Keys both have, with different versions or content. */
  readonly different: number;
  /** Keys written back to the source's state (a key changed by a live event meanwhile is left to it). */
  readonly repaired: number;
  /** A few of each, to look at. */
  readonly samples: { readonly missing: readonly string[]; readonly extra: readonly string[]; readonly different: readonly string[] };
  /** Messages this check exchanged over the bus: requests published, replies received. */
  readonly messages: { readonly sent: number; readonly received: number };
  /** Hashes, keys and rows those messages carried. */
  readonly entries: number;
  /** Tree nodes that differed at each level, root first, then leaves. */
  readonly differingNodes: readonly number[];
  /** Set when no check ran (a rebuild was in progress). */
  readonly skipped?: string;
  /** The tenant whose stamp the check ran in (a replica on tidings/stamps); absent on one database. */
  readonly tenant?: string;
  /** A check of every stamp: each stamp's report by tenant; the counts above are their sums. */
  readonly byTenant?: Readonly<Record<string, DriftReport>>;
}

export interface RebuildProgress {
  readonly done: number;
  /** The source's count when the transfer began. */
  readonly total: number | null;
}

export interface RebuildReport {
  readonly replica: string;
  readonly generation: number;
  readonly rows: number;
  readonly durationMs: number;
  readonly messages: { readonly sent: number; readonly received: number };
  /** The tenant whose stamp was rebuilt (a replica on tidings/stamps); absent on one database. */
  readonly tenant?: string;
  /** A rebuild of every stamp: each stamp's report by tenant; rows and messages above are their sums, generation the highest. */
  readonly byTenant?: Readonly<Record<string, RebuildReport>>;
}

export interface ReplicaStats {
  /** Events that changed a row. */
  readonly applied: number;
  /** Events older than (or as old as) the row they concerned: duplicates, late deliveries. */
  readonly stale: number;
  readonly deleted: number;
  readonly checks: number;
  readonly repaired: number;
  readonly rebuilds: number;
  readonly lastCheck: DriftReport | null;
  /** Rows in memory (with `memory: true`). */
  readonly memoryRows: number;
}
