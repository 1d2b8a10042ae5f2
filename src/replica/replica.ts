/**
 * A replica: this service's own copy of data another service owns, fed by that service's events, kept in
 * a table of this service's database (and, optionally, in memory for the hottest lookups).
 *
 * Glossary: the *source* owns the data and answers requests (source.ts); a *feed* is one contract whose
 * events change rows; a row's *version* is the source's version of that key; a *tombstone* is a deleted
 * row that keeps its version, so an older upsert delivered late cannot bring it back; a *generation* is
 * one physical table behind the replica's view, replaced whole by a rebuild.
 *
 * Tables (store.ts, sql.ts):
 *   replicas                  in the Tidings schema (migration 006), one row per replica: current
 *                             generation, the one being built, last check, last rebuild
 *   replica_<name>_g<n>       the rows of generation n (tombstones included), one per key and tenant,
 *                             with the log's row-level security policy, in the replica's schema
 *   replica_<name>            a view of the current generation's live rows: what readers query
 *   replica_<name>_apply_g<n> a function applying one event to generation n (and to the one being built)
 *
 * The parts: define.ts (declaring one), this file (applying events, reading, lifecycle), store.ts (its
 * tables), cache.ts (rows in memory), requests.ts (asking the source), drift.ts, rebuild.ts, stamps.ts (one
 * replica per stamp on a backbone per tenant, routed by tenant).
 */
import { defaultWarning } from '../core/warnings.ts';
import type { Bus } from '../core/bus.ts';
import type { AnyContract, InputOf } from '../core/contract.ts';
import { errorMessage, PermanentError, TidingsError } from '../core/errors.ts';
import { bytesOver, messageLimits } from '../core/limits.ts';
import { checkTenant, currentTenant } from '../core/tenant.ts';
import { OptionProblems } from '../core/options.ts';
import { PostgresBackbone } from '../postgres/backbone.ts';
import type { PgTransaction } from '../postgres/transaction.ts';
import { ambiguous, RowCache } from './cache.ts';
import {
  replicaDefaults,
  type DriftReport,
  type Feed,
  type RebuildProgress,
  type RebuildReport,
  type ReplicaDefinition,
  type ReplicaOptions,
  type ReplicaStats,
  type Staleness,
} from './define.ts';
import { digestTree } from './digest.ts';
import { checkDrift } from './drift.ts';
import { checkContract, rebuildContract, replyContract, requestContract } from './protocol.ts';
import { rebuild } from './rebuild.ts';
import { SourceRequests } from './requests.ts';
import { type ReplicaParts, ReplicaStore } from './store.ts';
import { replicaView, viewStatements } from './sql.ts';
import type { ReplicaReply } from './protocol.ts';
import { TenantStamps } from '../stamps/backbone.ts';
import { StampReplicas } from './stamps.ts';

/** Which tenant's rows a read sees: by default the code's tenant (`bus.withTenant`, or the message being handled). */
export interface ReadScope {
  /** This tenant's rows only, wherever the read runs. */
  readonly tenant?: string;
}

/**
 * What `replica()` returns: the reader and its operations (check, rebuild, staleness). On one database a
 * `SchemaReplica`; on a backbone per tenant (tidings/stamps) a `StampReplicas`, one replica per stamp, which
 * runs each call in the current tenant's stamp (or, for what sums up, in every stamp).
 */
export interface Replica<Row> {
  /** The replica's full name: the definition's, with the instance appended. */
  readonly name: string;
  readonly definition: ReplicaDefinition<Row>;
  /** The backbone's schema: the replica's tables live beside Tidings' own (on stamps: the current tenant's stamp's). */
  readonly schema: string;
  /** The view readers query (schema-qualified, quoted). */
  readonly view: string;
  ready(): Promise<void>;
  get(key: string, options?: ReadScope): Promise<Row | undefined>;
  lookup(index: string, value: string, options?: ReadScope): Row | undefined;
  query(where?: string, params?: readonly unknown[], options?: ReadScope & { limit?: number; orderBy?: string }): Promise<Row[]>;
  staleness(): Promise<Staleness>;
  caughtUp(timeoutMs?: number): Promise<void>;
  stats(): ReplicaStats;
  start(): Promise<void>;
  stop(): void;
  checkDrift(options?: { checkId?: string; repair?: boolean }): Promise<DriftReport>;
  rebuild(options?: { onProgress?: (progress: RebuildProgress) => void }): Promise<RebuildReport>;
}

/** A replica's options, checked, with their defaults applied. */
export interface ReplicaSettings {
  /** The replica's full name: the definition's, with the instance appended. */
  readonly name: string;
  readonly memory: boolean;
  readonly bootstrap: 'replay' | 'transfer';
  readonly driftCheckEveryMs: number;
  readonly requestTimeoutMs: number;
  readonly maxNodesPerRequest: number;
  readonly maxKeysPerRequest: number;
  readonly pageSize: number;
  readonly subscription: ReplicaOptions['subscription'];
  readonly warn: (message: string, error?: unknown) => void;
}

/** Checks a replica's options (OptionProblems names each bad one) and applies the defaults. */
export function replicaSettings(definition: Pick<ReplicaDefinition<unknown>, 'name'>, options: ReplicaOptions): ReplicaSettings {
  const problems = new OptionProblems(`replica ${definition.name}`);
  problems.oneOf('memory', options.memory, [true, false]);
  problems.oneOf('bootstrap', options.bootstrap, ['replay', 'transfer']);
  problems.integer('driftCheckEveryMs', options.driftCheckEveryMs, 0);
  problems.integer('requestTimeoutMs', options.requestTimeoutMs, 1);
  problems.integer('maxNodesPerRequest', options.maxNodesPerRequest, 1, digestTree.leaves);
  problems.integer('maxKeysPerRequest', options.maxKeysPerRequest, 1, 100_000);
  problems.integer('pageSize', options.pageSize, 1, 100_000);
  problems.check(
    options.instance === undefined || /^[a-z0-9]+(?:[_-][a-z0-9]+)*$/.test(options.instance),
    `instance must be lower-case letters and digits joined by "-" or "_", got ${JSON.stringify(options.instance)}`,
  );
  problems.throwIfAny();
  const d = replicaDefaults;
  return {
    name: options.instance === undefined ? definition.name : `${definition.name}-${options.instance}`,
    memory: options.memory ?? d.memory,
    bootstrap: options.bootstrap ?? (d.bootstrap as 'replay'),
    driftCheckEveryMs: options.driftCheckEveryMs ?? d.driftCheckEveryMs,
    requestTimeoutMs: options.requestTimeoutMs ?? d.requestTimeoutMs,
    maxNodesPerRequest: options.maxNodesPerRequest ?? d.maxNodesPerRequest,
    maxKeysPerRequest: options.maxKeysPerRequest ?? d.maxKeysPerRequest,
    pageSize: options.pageSize ?? d.pageSize,
    subscription: options.subscription,
    warn: options.onWarning ?? defaultWarning,
  };
}

/**
 * Declares a replica's subscriptions on `bus`: its feeds, and the source's answers with the check and rebuild
 * commands (on one of their own, so that a check waiting for answers never blocks the feed). Each message
 * goes to the replica `route` names for its tenant: the one replica, or its stamp's (stamps.ts).
 */
export function subscribeReplica<Row>(
  bus: Bus<PgTransaction>,
  definition: ReplicaDefinition<Row>,
  settings: ReplicaSettings,
  route: (tenant: string | undefined) => SchemaReplica<Row>,
): void {
  const feeds = bus.subscription(`replica.${settings.name}`, {
    ...settings.subscription,
    startFrom: settings.bootstrap === 'replay' ? 'beginning' : 'now',
  });
  for (const f of definition.feeds)
    feeds.on(f.contract, (message, ctx) => route(message.tenant).applyEvent(f, message.data, message.key, message.tenant ?? '', message.time, ctx.tx));
  bus
    .subscription(`replica.${settings.name}.replies`, { startFrom: 'now', concurrency: 16 })
    .on(replyContract(definition.source, settings.name), (message) => route(message.tenant).received(message.data))
    .on(checkContract(settings.name), (message) => {
      const target = route(message.tenant);
      // Not awaited: the check exchanges messages this subscription's own handlers must receive. Detached
      // from the handler, or its publishes would join this handler's (finished) transaction.
      bus.detached(() => {
        void target
          .checkDrift({ checkId: message.data.checkId })
          .catch((error: unknown) => settings.warn(`Replica ${settings.name}: drift check ${message.data.checkId} failed`, error));
      });
    })
    .on(rebuildContract(settings.name), (message) => {
      const target = route(message.tenant);
      // Like a check: not awaited, detached; progress and outcome go to the meta row, where
      // `tidings replica rebuild` reads them.
      bus.detached(() => {
        void target.rebuildOnRequest(message.data.rebuildId);
      });
    });
}

/** A replica whose tables live in one schema: the bus's one PostgreSQL backbone's, or one stamp's. */
export class SchemaReplica<Row> implements Replica<Row> {
  readonly name: string;
  readonly definition: ReplicaDefinition<Row>;
  readonly schema: string;
  readonly view: string;
  /** The stamp's tenant, for a replica in one stamp of a backbone per tenant. */
  readonly tenant: string | undefined;
  readonly #read: ReturnType<typeof viewStatements>;
  readonly #bus: Bus<PgTransaction>;
  readonly #backbone: PostgresBackbone;
  readonly #options: ReplicaSettings;
  readonly #feedSubscription: string;
  readonly #warn: (message: string, error?: unknown) => void;
  readonly #cache: RowCache<Row>;
  readonly #requests: SourceRequests;
  #store: ReplicaStore<Row> | undefined;
  #newestEvent: Date | null = null;
  #ready: Promise<void> | undefined;
  #timer: NodeJS.Timeout | undefined;
  #checking: Promise<DriftReport> | undefined;
  #rebuilding: Promise<RebuildReport> | undefined;
  #stopped = false;
  readonly #counts = { applied: 0, stale: 0, deleted: 0, checks: 0, repaired: 0, rebuilds: 0 };
  #lastCheck: DriftReport | null = null;

  /**
   * A replica in `backbone`'s schema; its subscriptions are declared apart (subscribeReplica). In a stamp
   * (`tenant` given) it works in the stamp's backbone directly, which is open (stamps.ts makes it when the
   * stamp opens), and asks the source in that stamp.
   */
  constructor(bus: Bus<PgTransaction>, backbone: PostgresBackbone, definition: ReplicaDefinition<Row>, settings: ReplicaSettings, tenant?: string) {
    this.#bus = bus;
    this.#backbone = backbone;
    this.definition = definition;
    this.tenant = tenant;
    this.name = settings.name;
    this.schema = backbone.schema;
    this.view = replicaView(this.schema, this.name);
    this.#read = viewStatements(this.view);
    this.#feedSubscription = `replica.${this.name}`;
    this.#warn = settings.warn;
    this.#options = settings;
    this.#cache = new RowCache(this.name, definition.indexes ?? {});
    this.#requests = new SourceRequests(
      <C extends AnyContract>(contract: C, data: readonly InputOf<C>[]) => bus.publishMany(contract, data, tenant === undefined ? {} : { tenant }),
      this.name,
      definition.source,
      requestContract(definition.source),
      this.#options.requestTimeoutMs,
    );
  }

  /**
   * A transaction of the replica's database: the bus's (which opens it if need be), or in a stamp its own
   * backbone's, since the bus's would wait for the stamp to be up, and its tables are made before that.
   */
  #transaction<T>(fn: (tx: PgTransaction) => Promise<T>): Promise<T> {
    return this.tenant === undefined ? this.#bus.transaction(fn) : this.#backbone.transaction(fn);
  }

  /** The replica's tables, once the backbone is open (its driver exists only then). */
  get #tables(): ReplicaStore<Row> {
    this.#store ??= new ReplicaStore<Row>(this.#backbone.driver, this.schema, this.name, this.definition.source);
    return this.#store;
  }

  /** Creates the replica's tables (once, whoever comes first) and fills the memory map. */
  ready(): Promise<void> {
    this.#ready ??= this.#prepare().catch((error: unknown) => {
      this.#ready = undefined;
      throw error;
    });
    return this.#ready;
  }

  async #prepare(): Promise<void> {
    await this.#transaction((tx) => this.#tables.prepare(tx));
    if (this.#options.memory) await this.#cache.reload(() => this.#tables.all());
  }

  // ---- applying events --------------------------------------------------------------------------------

  /** @internal A reply part from the source (the replies subscription hands them here). */
  received(reply: ReplicaReply): void {
    this.#requests.received(reply);
  }

  /** @internal Applies one feed event in the handler's transaction (the feed subscription calls it). */
  // biome-ignore lint/suspicious/noExplicitAny: the feed's contract types its own data
  async applyEvent(f: Feed<Row, any>, data: any, messageKey: string, tenant: string, time: Date, tx: PgTransaction): Promise<void> {
    await this.ready();
    const key = f.key === undefined ? messageKey : f.key(data);
    // The replica's table is keyed by it: a key over the limit could never be stored (a btree entry is at most ~2.7 kB).
    if (typeof key !== 'string' || bytesOver(key, messageLimits.keyBytes) !== undefined) {
      throw new PermanentError(
        `Replica ${this.name}: ${f.contract.topic} event has a key that is not a string of at most ${messageLimits.keyBytes} bytes; give the feed a shorter key`,
      );
    }
    const version = f.version === undefined ? data?.version : f.version(data);
    if (!Number.isSafeInteger(version) || version < 0) {
      throw new PermanentError(
        `Replica ${this.name}: ${f.contract.topic} event for key ${key} has no usable version (got ${JSON.stringify(version)}); give the feed a version function returning the source's version of the key`,
      );
    }
    const store = this.#tables;
    let applied: boolean;
    let next: Row | null;
    try {
      if (f.apply !== undefined) {
        // The meta row and the current row in one statement; the write in a second.
        const current = await store.readRow(tx, tenant, key);
        if (current !== undefined && current.version >= version) {
          this.#counts.stale++;
          return;
        }
        next = f.apply(current?.state ?? undefined, data);
      } else {
        next = f.delete ? null : f.upsert === undefined ? (data as Row) : f.upsert(data);
      }
      applied = await store.write(tx, tenant, key, version, next, time);
    } catch (error) {
      // Most likely a generation another process's rebuild switched away from and dropped: forget what we
      // knew, so that the bus's next attempt reads the meta row afresh.
      store.forget();
      throw error;
    }
    if (!applied) {
      this.#counts.stale++;
      return;
    }
    this.#counts.applied++;
    if (next === null) this.#counts.deleted++;
    if (this.#newestEvent === null || time > this.#newestEvent) this.#newestEvent = time;
    // Memory runs ahead of the table by at most the batch being acknowledged; a batch rolled back is
    // handled again and writes the same rows.
    if (this.#options.memory) this.#cache.remember(key, { tenant, version, row: next });
  }

  // ---- reading ------------------------------------------------------------------------------------------

  /**
   * The row of `key`, or undefined. From memory with `memory: true`, else one indexed query. A row is its
   * tenant's: inside `bus.withTenant(tenant)` or a handler of a tenant's message (or with `{ tenant }`), only
   * that tenant's row; elsewhere, whichever tenant's holds the key (TENANT_REQUIRED if several do).
   */
  async get(key: string, options: ReadScope = {}): Promise<Row | undefined> {
    const tenant = this.#tenantOf(options);
    await this.ready();
    if (this.#options.memory) return this.#cache.get(key, tenant);
    const { rows } = await this.#backbone.driver.query<{ tenant: string; state: Row }>(this.#read.get, [key, tenant ?? null]);
    if (rows.length > 1)
      throw ambiguous(
        this.name,
        `key ${key}`,
        rows.map((row) => row.tenant),
      );
    return rows[0]?.state;
  }

  /** The tenant a read is confined to: the one named, else the code's (withTenant, or the message being handled), else none. */
  #tenantOf(options: ReadScope): string | undefined {
    if (options.tenant !== undefined) return checkTenant(options.tenant, `Replica ${this.name}`);
    return currentTenant();
  }

  /**
   * The row whose index `index` (declared in `indexes`) has `value`; needs `memory: true`. Confined to a
   * tenant like `get`.
   */
  lookup(index: string, value: string, options: ReadScope = {}): Row | undefined {
    if (!this.#cache.hasIndex(index)) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Replica ${this.name} has no index ${JSON.stringify(index)}: declare it in defineReplica({ indexes })${this.#options.memory ? '' : ' and run the replica with memory: true'}`,
      );
    }
    if (!this.#options.memory) throw new TidingsError('INVALID_OPTIONS', `Replica ${this.name}: lookup needs memory: true; without it, use query()`);
    return this.#cache.lookup(index, value, this.#tenantOf(options));
  }

  /**
   * Rows matching a SQL condition on the view's columns (`key`, `version`, `state` jsonb, `event_time`),
   * with values as parameters: `query("state->>'email' = $1", [email])`. The condition is SQL text: never
   * build it from input. Inside a tenant's scope (as `get` says), only that tenant's rows; elsewhere every
   * tenant's (the view has a `tenant` column, '' for rows of none).
   */
  async query(where = 'true', params: readonly unknown[] = [], options: ReadScope & { limit?: number; orderBy?: string } = {}): Promise<Row[]> {
    const tenant = this.#tenantOf(options);
    await this.ready();
    const { rows } = await this.#backbone.driver.query<{ state: Row }>(
      this.#read.query(where, options.orderBy ?? 'key', options.limit, tenant === undefined ? undefined : params.length + 1),
      tenant === undefined ? params : [...params, tenant],
    );
    return rows.map((row) => row.state);
  }

  /** How far behind the source this replica is: unapplied events, and the age of the newest one applied. */
  async staleness(): Promise<Staleness> {
    await this.ready();
    const [lag, newest] = await Promise.all([this.#backbone.lag(this.#feedSubscription), this.#tables.newest()]);
    const newestEventAt = newest.at ?? this.#newestEvent;
    return { lag, newestEventAt, ageMs: newestEventAt === null ? null : Math.max(0, newest.now.getTime() - newestEventAt.getTime()) };
  }

  /** Waits until every committed source event is applied (lag 0). */
  async caughtUp(timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ((await this.staleness()).lag > 0) {
      if (Date.now() > deadline)
        throw new TidingsError(
          'SOURCE_UNAVAILABLE',
          `Replica ${this.name} did not catch up with ${this.definition.source} within ${timeoutMs} ms; see tidings status --subscription ${this.#feedSubscription}`,
        );
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  stats(): ReplicaStats {
    return { ...this.#counts, lastCheck: this.#lastCheck, memoryRows: this.#cache.size };
  }

  // ---- lifecycle --------------------------------------------------------------------------------------------

  /**
   * Prepares the tables and memory, fills a new replica by state transfer (with `bootstrap: 'transfer'`),
   * and starts periodic drift checks. Call after `bus.start()`.
   */
  async start(): Promise<void> {
    await this.ready();
    if (this.#options.bootstrap === 'transfer' && !(await this.#tables.readMeta(this.#backbone.driver)).filled) await this.rebuild();
    if (this.#options.driftCheckEveryMs > 0 && this.#timer === undefined) {
      const every = this.#options.driftCheckEveryMs;
      const tick = () => {
        // Jitter, so the gateways of a farm do not all check at the same moment.
        this.#timer = setTimeout(
          () => {
            this.checkDrift()
              .catch((error: unknown) => this.#warn(`Replica ${this.name}: periodic drift check failed`, error))
              .finally(() => {
                if (!this.#stopped) tick();
              });
          },
          every * (0.9 + Math.random() * 0.2),
        );
        this.#timer.unref();
      };
      tick();
    }
  }

  /** Stops periodic checks and fails requests still waiting. Call before `bus.stop()`. */
  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#requests.stop();
  }

  // ---- drift and rebuild ------------------------------------------------------------------------------------

  /**
   * Compares this replica with its source and repairs the keys that differ (drift.ts). One check at a time
   * per process: a second caller shares the running one.
   */
  checkDrift(options: { checkId?: string; repair?: boolean } = {}): Promise<DriftReport> {
    this.#checking ??= this.#check(options).finally(() => {
      this.#checking = undefined;
    });
    return this.#checking;
  }

  async #check(options: { checkId?: string; repair?: boolean }): Promise<DriftReport> {
    await this.ready();
    const { maxNodesPerRequest, maxKeysPerRequest } = this.#options;
    const { report, written } = await checkDrift({ ...this.#parts(), maxNodesPerRequest, maxKeysPerRequest }, options);
    if (this.#options.memory) for (const [key, entry] of written) this.#cache.remember(key, entry, true);
    this.#lastCheck = report;
    if (report.skipped === undefined) {
      this.#counts.checks++;
      this.#counts.repaired += report.repaired;
    }
    return report;
  }

  /** What a drift check and a rebuild need of this replica (store.ts, ReplicaParts). */
  #parts(): ReplicaParts<Row> {
    return { name: this.name, tenant: this.tenant, store: this.#tables, requests: this.#requests, transaction: (fn) => this.#transaction(fn) };
  }

  /** Fills a fresh table from the source's state and switches readers to it at once (rebuild.ts). */
  rebuild(options: { onProgress?: (progress: RebuildProgress) => void } = {}): Promise<RebuildReport> {
    if (this.#rebuilding !== undefined) {
      return Promise.reject(
        new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Replica ${this.name}: a rebuild is already running in this process; wait for it (tidings drift status shows the generation being built)`,
        ),
      );
    }
    const running = this.#rebuild(options).finally(() => {
      this.#rebuilding = undefined;
    });
    this.#rebuilding = running;
    return running;
  }

  async #rebuild(options: { onProgress?: (progress: RebuildProgress) => void }): Promise<RebuildReport> {
    await this.ready();
    if (this.#options.memory) this.#cache.capture();
    let report: RebuildReport;
    try {
      report = await rebuild({ ...this.#parts(), pageSize: this.#options.pageSize }, options.onProgress);
    } catch (error) {
      this.#cache.release();
      throw error;
    }
    if (this.#options.memory) await this.#cache.reload(() => this.#tables.all());
    this.#counts.rebuilds++;
    return report;
  }

  /**
   * @internal A rebuild asked for over the bus (tidings replica rebuild): its progress, then its report or
   * error, recorded in the meta row under the request's id, at most every 100 ms until the end.
   */
  async rebuildOnRequest(rebuildId: string): Promise<void> {
    const record = (value: Record<string, unknown>) => this.#tables.recordRebuild({ rebuildId, at: new Date().toISOString(), ...value });
    let last = 0;
    let writing: Promise<unknown> = Promise.resolve();
    try {
      await record({ state: 'running', done: 0, total: null });
      const report = await this.rebuild({
        onProgress: ({ done, total }) => {
          if (Date.now() - last < 100) return;
          last = Date.now();
          writing = writing.then(() => record({ state: 'running', done, total })).catch(() => undefined);
        },
      });
      await writing;
      await record({ state: 'done', done: report.rows, total: report.rows, report });
    } catch (error) {
      await writing;
      this.#warn(`Replica ${this.name}: rebuild ${rebuildId} failed`, error);
      await record({ state: 'failed', error: errorMessage(error) }).catch(() => undefined);
    }
  }
}

/**
 * Runs a replica of `definition` on `bus`: subscribes its feeds and returns the reader. The backbone must be
 * PostgreSQL (the replica's tables live in its database), or a backbone per tenant whose stamps are
 * PostgreSQL: one replica per stamp then (stamps.ts).
 */
export function replica<Row>(bus: Bus<PgTransaction>, definition: ReplicaDefinition<Row>, options: ReplicaOptions = {}): Replica<Row> {
  const { backbone } = bus;
  if (backbone instanceof TenantStamps) {
    const settings = replicaSettings(definition, options);
    return new StampReplicas(bus, backbone, definition, settings, {
      make: (stamp, tenant) => new SchemaReplica(bus, stamp, definition, settings, tenant),
      subscribe: (route) => subscribeReplica(bus, definition, settings, route),
    });
  }
  if (!(backbone instanceof PostgresBackbone)) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `Invalid options for replica ${definition?.name}: the bus must run on the PostgreSQL backbone (postgres({ url }) or postgres({ pglite: true })), or on tenantStamps() of PostgreSQL backbones: replicas live in its database`,
    );
  }
  const settings = replicaSettings(definition, options);
  const one = new SchemaReplica(bus, backbone, definition, settings);
  subscribeReplica(bus, definition, settings, () => one);
  return one;
}
