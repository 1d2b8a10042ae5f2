/**
 * A replica: this service's own copy of data another service owns, fed by that service's events, kept in
 * a table of this service's database (and, optionally, in memory for the hottest lookups).
 *
 * Glossary: the *source* owns the data and answers requests (source.ts); a *feed* is one contract whose
 * events change rows; a row's *version* is the source's version of that key; a *tombstone* is a deleted
 * row that keeps its version, so an older upsert delivered late cannot bring it back; a *generation* is
 * one physical table behind the replica's view, replaced whole by a rebuild.
 *
 * Tables, in the replica's schema:
 *   replicas                  one row per replica: current generation, the one being built, last check
 *   replica_<name>_g<n>       the rows of generation n (tombstones included)
 *   replica_<name>            a view of the current generation's live rows: what readers query
 *   replica_<name>_apply_g<n> a function applying one event to generation n (and to the one being built)
 */
import { bytesOver, messageLimits } from '../core/limits.ts';
import type { Bus } from '../core/bus.ts';
import { validateName, type AnyContract, type DataOf } from '../core/contract.ts';
import { newId } from '../core/envelope.ts';
import { PermanentError, TidingsError } from '../core/errors.ts';
import { handlerScope } from '../core/handler.ts';
import { OptionProblems, type SubscribeOptions } from '../core/options.ts';
import { readStatus } from '../postgres/admin.ts';
import { checkIdentifier, type Queryable, type SqlDriver } from '../postgres/driver.ts';
import type { PgTransaction } from '../postgres/transaction.ts';
import { bucketSql, buildTree, childrenOf, chunks, digestTree, leavesFrom, rowHashSql } from './digest.ts';
import { checkContract, rebuildContract, replyContract, requestContract, type ReplicaReply, type ReplicaRequest, type StateRow } from './protocol.ts';

// ---- declaring a replica ---------------------------------------------------------------------------

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
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- each feed has its own contract
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
    problems.check([f.apply, f.upsert, f.delete].filter((x) => x !== undefined).length <= 1, `feeds[${i}] (${f.contract.topic}): give at most one of apply, upsert and delete`);
  }
  problems.throwIfAny();
  return Object.freeze({ ...definition });
}

// ---- running one -------------------------------------------------------------------------------------

export interface ReplicaOptions {
  /** Tells apart replicas of one definition in one database (one per gateway node): `credentials-<instance>`. */
  instance?: string;
  /** Keep every row in memory too: `get` and `lookup` answer without a query. One process per replica then. */
  memory?: boolean;
  /** Schema of the replica's tables; defaults to the bus backbone's schema. */
  schema?: string;
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
  schema: undefined as string | undefined,
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

interface Entry<Row> {
  version: number;
  /** null: a tombstone. */
  row: Row | null;
}

interface Meta {
  generation: number;
  building: number | null;
  filled: boolean;
}

interface Pending {
  readonly parts: Map<number, ReplicaReply>;
  expected: number;
  resolve(replies: ReplicaReply[]): void;
  reject(error: unknown): void;
  timer: NodeJS.Timeout;
}

/** The reader a replica returns, and its operations: check, rebuild, staleness. */
export class Replica<Row> {
  /** The replica's full name: the definition's, with the instance appended. */
  readonly name: string;
  readonly definition: ReplicaDefinition<Row>;
  readonly schema: string;
  /** The view readers query (schema-qualified, quoted). */
  readonly view: string;
  readonly #bus: Bus<PgTransaction>;
  readonly #options: Required<Pick<ReplicaOptions, 'memory' | 'bootstrap' | 'driftCheckEveryMs' | 'requestTimeoutMs' | 'maxNodesPerRequest' | 'maxKeysPerRequest' | 'pageSize'>>;
  readonly #base: string;
  readonly #feedSubscription: string;
  readonly #request: ReturnType<typeof requestContract>;
  readonly #warn: (message: string, error?: unknown) => void;
  readonly #pending = new Map<string, Pending>();
  readonly #memory = new Map<string, Entry<Row>>();
  readonly #indexes = new Map<string, Map<string, string>>();
  /** Set while the memory map is reloaded: updates meanwhile are replayed onto the new map. */
  #reloading: Array<[string, Entry<Row>]> | undefined;
  #newestEvent: Date | null = null;
  /** The generations this process last read from the meta row; every write verifies them (see #write). */
  #known: Meta | undefined;
  #ready: Promise<void> | undefined;
  #timer: NodeJS.Timeout | undefined;
  #checking: Promise<DriftReport> | undefined;
  #rebuilding: Promise<RebuildReport> | undefined;
  #stopped = false;
  readonly #counts = { applied: 0, stale: 0, deleted: 0, checks: 0, repaired: 0, rebuilds: 0 };
  #lastCheck: DriftReport | null = null;

  constructor(bus: Bus<PgTransaction>, definition: ReplicaDefinition<Row>, options: ReplicaOptions = {}) {
    const problems = new OptionProblems(`replica ${definition.name}`);
    problems.oneOf('memory', options.memory, [true, false]);
    problems.oneOf('bootstrap', options.bootstrap, ['replay', 'transfer']);
    problems.integer('driftCheckEveryMs', options.driftCheckEveryMs, 0);
    problems.integer('requestTimeoutMs', options.requestTimeoutMs, 1);
    problems.integer('maxNodesPerRequest', options.maxNodesPerRequest, 1, digestTree.leaves);
    problems.integer('maxKeysPerRequest', options.maxKeysPerRequest, 1, 100_000);
    problems.integer('pageSize', options.pageSize, 1, 100_000);
    problems.check(options.instance === undefined || /^[a-z0-9]+(?:[_-][a-z0-9]+)*$/.test(options.instance), `instance must be lower-case letters and digits joined by "-" or "_", got ${JSON.stringify(options.instance)}`);
    const backbone = bus.backbone as { schema?: unknown; driver?: unknown };
    problems.check(typeof backbone.schema === 'string' && 'driver' in backbone, 'the bus must run on the PostgreSQL backbone (postgres({ url }) or postgres({ pglite: true })): replicas live in its database');
    problems.throwIfAny();
    this.#bus = bus;
    this.definition = definition;
    this.name = options.instance === undefined ? definition.name : `${definition.name}-${options.instance}`;
    this.schema = checkIdentifier('replica schema', options.schema ?? (backbone.schema as string));
    this.#base = checkIdentifier('replica table', `replica_${this.name.replace(/[.-]/g, '_')}`.slice(0, 52));
    this.view = `"${this.schema}"."${this.#base}"`;
    this.#feedSubscription = `replica.${this.name}`;
    this.#request = requestContract(definition.source);
    this.#warn = options.onWarning ?? ((message, error) => console.warn(`[tidings] ${message}${error instanceof Error ? `: ${error.message}` : ''}`));
    const d = replicaDefaults;
    this.#options = {
      memory: options.memory ?? d.memory,
      bootstrap: options.bootstrap ?? (d.bootstrap as 'replay'),
      driftCheckEveryMs: options.driftCheckEveryMs ?? d.driftCheckEveryMs,
      requestTimeoutMs: options.requestTimeoutMs ?? d.requestTimeoutMs,
      maxNodesPerRequest: options.maxNodesPerRequest ?? d.maxNodesPerRequest,
      maxKeysPerRequest: options.maxKeysPerRequest ?? d.maxKeysPerRequest,
      pageSize: options.pageSize ?? d.pageSize,
    };
    for (const name of Object.keys(definition.indexes ?? {})) this.#indexes.set(name, new Map());

    const feeds = bus.subscription(this.#feedSubscription, {
      ...options.subscription,
      startFrom: this.#options.bootstrap === 'replay' ? 'beginning' : 'now',
    });
    for (const f of definition.feeds) feeds.on(f.contract, (message, ctx) => this.#apply(f, message.data, message.key, message.time, ctx.tx));
    // Answers from the source, and check commands (tidings drift check), on a subscription of their own
    // so that a check waiting for answers never blocks the feed.
    bus
      .subscription(`replica.${this.name}.replies`, { startFrom: 'now', concurrency: 16 })
      .on(replyContract(definition.source, this.name), (message) => this.#received(message.data))
      .on(checkContract(this.name), (message) => {
        // Not awaited: the check exchanges messages this subscription's own handlers must receive. Run
        // outside the handler's scope, or its publishes would join this handler's (finished) transaction.
        handlerScope.exit(() => {
          void this.checkDrift({ checkId: message.data.checkId }).catch((error: unknown) => this.#warn(`Replica ${this.name}: drift check ${message.data.checkId} failed`, error));
        });
      })
      .on(rebuildContract(this.name), (message) => {
        // Like a check: not awaited, outside the handler's scope; progress and outcome go to the meta row,
        // where `tidings replica rebuild` reads them.
        handlerScope.exit(() => {
          void this.#rebuildOnRequest(message.data.rebuildId);
        });
      });
  }

  // ---- storage --------------------------------------------------------------------------------------

  get #driver(): SqlDriver {
    return (this.#bus.backbone as unknown as { driver: SqlDriver }).driver;
  }

  #table(generation: number): string {
    return `"${this.schema}"."${this.#base}_g${generation}"`;
  }

  get #meta(): string {
    return `"${this.schema}".replicas`;
  }

  async #createGeneration(q: Queryable, generation: number): Promise<void> {
    const table = this.#table(generation);
    await q.query(
      `create table if not exists ${table} (
         key text primary key,
         version int8 not null,
         state jsonb,
         event_time timestamptz,
         updated_at timestamptz not null default now(),
         bucket int not null generated always as (${bucketSql('key')}) stored,
         hash int8 generated always as (case when state is null then null else ${rowHashSql('key', 'version', 'state')} end) stored
       )`,
    );
    await q.query(`create index if not exists "${this.#base}_g${generation}_bucket" on ${table} (bucket)`);
    await q.query(`create index if not exists "${this.#base}_g${generation}_event_time" on ${table} (event_time)`);
    await q.query(this.#applyFunctionSql(generation));
  }

  /** The function applying one event to generation `generation` (see #write). */
  #applyFunction(generation: number): string {
    return `"${this.schema}"."${this.#base}_apply_g${generation}"`;
  }

  /**
   * One event's write as a function per generation, created with its table: it checks the meta row (the
   * generation readers see, and the one a rebuild fills) and writes the guarded upsert into that
   * generation, and into the one being built. One round trip per event, and PL/pgSQL keeps the plans of
   * its statements for the session instead of planning them for every event. Returns the rows written in
   * this generation (0: the key is at this version or newer), -1 if the meta row says otherwise than
   * `building` (the caller rereads it), -2 if there is no meta row.
   */
  #applyFunctionSql(generation: number): string {
    const upsert = (table: string) => `insert into ${table} as t (key, version, state, event_time) values (k, v, st, et)
        on conflict (key) do update set version = excluded.version, state = excluded.state, event_time = excluded.event_time, updated_at = now()
         where t.version < excluded.version`;
    const name = this.name.replace(/'/g, "''");
    return `create or replace function ${this.#applyFunction(generation)}(k text, v int8, st jsonb, et timestamptz, expected_building int) returns int
      language plpgsql as $apply$
      declare
        current_generation int;
        building_generation int;
        written int;
      begin
        select generation, building into current_generation, building_generation from ${this.#meta} where name = '${name}';
        if not found then return -2; end if;
        if current_generation <> ${generation} or building_generation is distinct from expected_building then return -1; end if;
        ${upsert(this.#table(generation))};
        get diagnostics written = row_count;
        -- Planned only when reached: the next generation's table need not exist before.
        if building_generation = ${generation + 1} then
          ${upsert(this.#table(generation + 1))};
        elsif building_generation is not null then
          execute format($sql$${upsert(`%I.%I`).replace('values (k, v, st, et)', 'values ($1, $2, $3, $4)')}$sql$, '${this.schema}', '${this.#base}_g' || building_generation) using k, v, st, et;
        end if;
        return written;
      end
      $apply$`;
  }

  async #point(q: Queryable, generation: number): Promise<void> {
    await q.query(`create or replace view ${this.view} as select key, version, state, event_time, updated_at from ${this.#table(generation)} where state is not null`);
  }

  async #readMeta(q: Queryable, lock = false): Promise<Meta> {
    const { rows } = await q.query<{ generation: number; building: number | null; filled_at: unknown }>(
      `select generation, building, filled_at from ${this.#meta} where name = $1${lock ? ' for update' : ''}`,
      [this.name],
    );
    const row = rows[0];
    if (row === undefined) throw new TidingsError('NOT_STARTED', `Replica ${this.name} has no tables yet in schema ${this.schema}: start its bus, or call replica.start()`);
    return { generation: Number(row.generation), building: row.building === null ? null : Number(row.building), filled: row.filled_at !== null };
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
    await this.#bus.transaction(async (tx) => {
      // Two processes starting at once would race on create table ... if not exists.
      await tx.query(`select pg_advisory_xact_lock(hashtext('tidings.replica'), hashtext($1))`, [`${this.schema}.${this.name}`]);
      await tx.query(`create schema if not exists "${this.schema}"`);
      await tx.query(
        `create table if not exists ${this.#meta} (
           name text primary key,
           source text not null,
           generation int not null default 1,
           building int,
           filled_at timestamptz,
           rebuilt_at timestamptz,
           checked_at timestamptz,
           last_check jsonb,
           rebuild jsonb
         )`,
      );
      // Tables made by a version without rebuild progress; altered only when needed (the lock is exclusive).
      const { rows: column } = await tx.query(`select 1 from pg_attribute where attrelid = to_regclass($1) and attname = 'rebuild' and not attisdropped`, [this.#meta]);
      if (column.length === 0) await tx.query(`alter table ${this.#meta} add column if not exists rebuild jsonb`);
      await tx.query(`insert into ${this.#meta} (name, source) values ($1, $2) on conflict (name) do nothing`, [this.name, this.definition.source]);
      const meta = await this.#readMeta(tx);
      await this.#createGeneration(tx, meta.generation);
      await this.#point(tx, meta.generation);
    });
    if (this.#options.memory) await this.#reload();
  }

  async #reload(): Promise<void> {
    this.#reloading = [];
    try {
      const { rows } = await this.#driver.query<{ key: string; version: string | number; state: Row | null; event_time: Date | string | null }>(
        `select key, version, state, event_time from ${this.#table((await this.#readMeta(this.#driver)).generation)}`,
      );
      const fresh = new Map<string, Entry<Row>>();
      for (const row of rows) fresh.set(row.key, { version: Number(row.version), row: row.state });
      // Events applied while we read: keep whichever version is newer.
      for (const [key, entry] of this.#reloading) {
        const have = fresh.get(key);
        if (have === undefined || have.version < entry.version) fresh.set(key, entry);
      }
      this.#memory.clear();
      for (const index of this.#indexes.values()) index.clear();
      for (const [key, entry] of fresh) this.#remember(key, entry, true);
    } finally {
      this.#reloading = undefined;
    }
  }

  /** Puts an entry in memory if it is newer (or `force`: a repair), keeping the indexes in step. */
  #remember(key: string, entry: Entry<Row>, force = false): void {
    if (!this.#options.memory) return;
    this.#reloading?.push([key, entry]);
    const old = this.#memory.get(key);
    if (!force && old !== undefined && old.version >= entry.version) return;
    for (const [name, index] of this.#indexes) {
      const fn = this.definition.indexes![name]!;
      if (old?.row != null) {
        const value = fn(old.row);
        if (index.get(value) === key) index.delete(value);
      }
      if (entry.row !== null) index.set(fn(entry.row), key);
    }
    this.#memory.set(key, entry);
  }

  // ---- applying events --------------------------------------------------------------------------------

  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- the feed's contract types its own data
  async #apply(f: Feed<Row, any>, data: any, messageKey: string, time: Date, tx: PgTransaction): Promise<void> {
    await this.ready();
    const key = f.key === undefined ? messageKey : f.key(data);
    // The replica's table is keyed by it: a key over the limit could never be stored (a btree entry is at most ~2.7 kB).
    if (typeof key !== 'string' || bytesOver(key, messageLimits.keyBytes) !== undefined) {
      throw new PermanentError(`Replica ${this.name}: ${f.contract.topic} event has a key that is not a string of at most ${messageLimits.keyBytes} bytes; give the feed a shorter key`);
    }
    const version = f.version === undefined ? data?.version : f.version(data);
    if (!Number.isSafeInteger(version) || version < 0) {
      throw new PermanentError(`Replica ${this.name}: ${f.contract.topic} event for key ${key} has no usable version (got ${JSON.stringify(version)}); give the feed a version function returning the source's version of the key`);
    }
    let applied: boolean;
    let next: Row | null;
    try {
      if (f.apply !== undefined) {
        // The meta row and the current row in one statement; the write in a second.
        const read = await this.#readRow(tx, key);
        if (read.current !== undefined && read.current.version >= version) {
          this.#counts.stale++;
          return;
        }
        next = f.apply(read.current?.state ?? undefined, data);
      } else {
        next = f.delete ? null : f.upsert === undefined ? (data as Row) : f.upsert(data);
      }
      applied = await this.#write(tx, key, version, next, time);
    } catch (error) {
      // Most likely a generation another process's rebuild switched away from and dropped: forget what we
      // knew, so that the bus's next attempt reads the meta row afresh.
      this.#known = undefined;
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
    this.#remember(key, { version, row: next });
  }

  /**
   * The generation(s) to write, as this process last saw them. Every write checks them against the meta
   * row in the same statement, so a rebuild started or switched by any process is seen by the next event:
   * a mismatch rereads and writes again.
   */
  async #generations(q: Queryable): Promise<Meta> {
    this.#known ??= await this.#readMeta(q);
    return this.#known;
  }

  /** The meta row and the key's current row (locked), in one statement. */
  async #readRow(tx: PgTransaction, key: string): Promise<{ current: { version: number; state: Row | null } | undefined }> {
    for (;;) {
      const known = await this.#generations(tx);
      const { rows } = await tx.query<{ generation: number; building: number | null; version: string | number | null; state: Row | null }>(
        `select m.generation, m.building, r.version, r.state
           from ${this.#meta} m
           left join lateral (select version, state from ${this.#table(known.generation)} where key = $2 for update) r on true
          where m.name = $1`,
        [this.name, key],
      );
      const row = rows[0];
      if (row === undefined) throw new TidingsError('NOT_STARTED', `Replica ${this.name} has no meta row in ${this.#meta}: was its schema dropped while it ran?`);
      if (Number(row.generation) === known.generation && (row.building === null ? null : Number(row.building)) === known.building) {
        return { current: row.version === null ? undefined : { version: Number(row.version), state: row.state } };
      }
      this.#known = undefined;
    }
  }

  /**
   * Writes a row unless the table has this key at this version or newer, in one statement (the generation's
   * apply function): into the current generation, and the one a rebuild fills, which gets every event too.
   * True if it wrote the current one.
   */
  async #write(tx: PgTransaction, key: string, version: number, row: Row | null, time: Date | null): Promise<boolean> {
    for (;;) {
      const known = await this.#generations(tx);
      const { rows } = await tx.query<{ n: number }>(`select ${this.#applyFunction(known.generation)}($1, $2, $3::jsonb, $4, $5) as n`, [
        key,
        version,
        row === null ? null : JSON.stringify(row),
        time,
        known.building,
      ]);
      const n = Number(rows[0]?.n);
      if (n >= 0) return n > 0;
      if (n === -2) throw new TidingsError('NOT_STARTED', `Replica ${this.name} has no meta row in ${this.#meta}: was its schema dropped while it ran?`);
      this.#known = undefined;
    }
  }

  // ---- reading ------------------------------------------------------------------------------------------

  /** The row of `key`, or undefined. From memory with `memory: true`, else one indexed query. */
  async get(key: string): Promise<Row | undefined> {
    await this.ready();
    if (this.#options.memory) return this.#memory.get(key)?.row ?? undefined;
    const { rows } = await this.#driver.query<{ state: Row }>(`select state from ${this.view} where key = $1`, [key]);
    return rows[0]?.state;
  }

  /** The row whose index `index` (declared in `indexes`) has `value`; needs `memory: true`. */
  lookup(index: string, value: string): Row | undefined {
    const keys = this.#indexes.get(index);
    if (keys === undefined) throw new TidingsError('INVALID_OPTIONS', `Replica ${this.name} has no index ${JSON.stringify(index)}: declare it in defineReplica({ indexes })${this.#options.memory ? '' : ' and run the replica with memory: true'}`);
    if (!this.#options.memory) throw new TidingsError('INVALID_OPTIONS', `Replica ${this.name}: lookup needs memory: true; without it, use query()`);
    const key = keys.get(value);
    return key === undefined ? undefined : (this.#memory.get(key)?.row ?? undefined);
  }

  /**
   * Rows matching a SQL condition on the view's columns (`key`, `version`, `state` jsonb, `event_time`),
   * with values as parameters: `query("state->>'email' = $1", [email])`. The condition is SQL text: never
   * build it from input.
   */
  async query(where = 'true', params: readonly unknown[] = [], options: { limit?: number; orderBy?: string } = {}): Promise<Row[]> {
    await this.ready();
    const { rows } = await this.#driver.query<{ state: Row }>(
      `select state from ${this.view} where ${where} order by ${options.orderBy ?? 'key'}${options.limit === undefined ? '' : ` limit ${Math.max(0, Math.floor(options.limit))}`}`,
      params,
    );
    return rows.map((row) => row.state);
  }

  /** How far behind the source this replica is: unapplied events, and the age of the newest one applied. */
  async staleness(): Promise<Staleness> {
    await this.ready();
    const backbone = this.#bus.backbone as unknown as { schema: string };
    const [status, newest] = await Promise.all([
      readStatus(this.#driver, { schema: backbone.schema, subscription: this.#feedSubscription }).catch(() => undefined),
      this.#driver.query<{ at: Date | string | null; now: Date | string }>(
        `select max(event_time) as at, now() as now from ${this.#table((await this.#readMeta(this.#driver)).generation)}`,
      ),
    ]);
    const at = newest.rows[0]?.at;
    const newestEventAt = at == null ? this.#newestEvent : new Date(at);
    return {
      lag: status?.subscriptions[0]?.lag ?? 0,
      newestEventAt,
      ageMs: newestEventAt === null ? null : Math.max(0, new Date(newest.rows[0]!.now).getTime() - newestEventAt.getTime()),
    };
  }

  /** Waits until every committed source event is applied (lag 0). */
  async caughtUp(timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ((await this.staleness()).lag > 0) {
      if (Date.now() > deadline) throw new TidingsError('SOURCE_UNAVAILABLE', `Replica ${this.name} did not catch up with ${this.definition.source} within ${timeoutMs} ms; see tidings status --subscription ${this.#feedSubscription}`);
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }

  stats(): ReplicaStats {
    return { ...this.#counts, lastCheck: this.#lastCheck, memoryRows: this.#memory.size };
  }

  // ---- lifecycle --------------------------------------------------------------------------------------------

  /**
   * Prepares the tables and memory, fills a new replica by state transfer (with `bootstrap: 'transfer'`),
   * and starts periodic drift checks. Call after `bus.start()`.
   */
  async start(): Promise<void> {
    await this.ready();
    if (this.#options.bootstrap === 'transfer' && !(await this.#readMeta(this.#driver)).filled) await this.rebuild();
    if (this.#options.driftCheckEveryMs > 0 && this.#timer === undefined) {
      const every = this.#options.driftCheckEveryMs;
      const tick = () => {
        // Jitter, so the gateways of a farm do not all check at the same moment.
        this.#timer = setTimeout(() => {
          this.checkDrift()
            .catch((error: unknown) => this.#warn(`Replica ${this.name}: periodic drift check failed`, error))
            .finally(() => {
              if (!this.#stopped) tick();
            });
        }, every * (0.9 + Math.random() * 0.2));
        this.#timer.unref();
      };
      tick();
    }
  }

  /** Stops periodic checks and fails requests still waiting. Call before `bus.stop()`. */
  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
    for (const [id, pending] of this.#pending) {
      clearTimeout(pending.timer);
      pending.reject(new TidingsError('STOPPED', `Replica ${this.name} stopped while request ${id} waited for ${this.definition.source}`));
    }
    this.#pending.clear();
  }

  // ---- talking to the source ---------------------------------------------------------------------------------

  #received(reply: ReplicaReply): void {
    const pending = this.#pending.get(reply.requestId);
    // An answer to a request this process no longer waits for (a restart, a timeout): nothing to do.
    if (pending === undefined) return;
    pending.parts.set(reply.part, reply);
    pending.expected = reply.parts;
    if (pending.parts.size >= pending.expected) {
      clearTimeout(pending.timer);
      this.#pending.delete(reply.requestId);
      pending.resolve([...pending.parts.values()].sort((a, b) => a.part - b.part));
    }
  }

  /** Publishes requests and waits for every part of every answer. */
  async #ask(requests: ReplicaRequest[], traffic: { sent: number; received: number }): Promise<ReplicaReply[][]> {
    const answers = requests.map(
      (request) =>
        new Promise<ReplicaReply[]>((resolve, reject) => {
          const timer = setTimeout(() => {
            this.#pending.delete(request.requestId);
            reject(
              new TidingsError(
                'SOURCE_UNAVAILABLE',
                `Replica ${this.name}: ${this.definition.source} did not answer request ${request.requestId} (${request.kind}) on ${this.#request.topic} within ${this.#options.requestTimeoutMs} ms. Is the source service running with source(bus, ...) for ${this.definition.source}? Check its subscription replica-source.${this.definition.source} in tidings status and its dead letters.`,
              ),
            );
          }, this.#options.requestTimeoutMs);
          this.#pending.set(request.requestId, { parts: new Map(), expected: Number.POSITIVE_INFINITY, resolve, reject, timer });
        }),
    );
    // Registered before publishing: an answer can arrive before publishMany returns.
    answers.forEach((answer) => answer.catch(() => undefined));
    await this.#bus.publishMany(this.#request, requests);
    traffic.sent += requests.length;
    const replies = await Promise.all(answers);
    for (const parts of replies) traffic.received += parts.length;
    return replies;
  }

  /**
   * Compares this replica with its source, top-down through the digest tree (root, then only the differing
   * children, down to the leaves, then the keys of differing leaves), and repairs the keys that differ
   * with the source's state. The messages exchanged grow with the number of differences, not of keys.
   */
  checkDrift(options: { checkId?: string; repair?: boolean } = {}): Promise<DriftReport> {
    // One check at a time per process: a second caller shares the running one.
    this.#checking ??= this.#check(options).finally(() => {
      this.#checking = undefined;
    });
    return this.#checking;
  }

  async #check(options: { checkId?: string; repair?: boolean }): Promise<DriftReport> {
    await this.ready();
    const started = Date.now();
    const checkId = options.checkId ?? newId();
    const traffic = { sent: 0, received: 0 };
    let entries = 0;
    const driver = this.#driver;
    const meta = await this.#readMeta(driver);
    const base = { checkId, replica: this.name, at: new Date(started).toISOString() };
    if (meta.building !== null) {
      const report: DriftReport = { ...base, durationMs: 0, missing: 0, extra: 0, different: 0, repaired: 0, samples: { missing: [], extra: [], different: [] }, messages: traffic, entries, differingNodes: [], skipped: `a rebuild (generation ${meta.building}) is in progress` };
      await this.#record(report);
      return report;
    }
    const table = this.#table(meta.generation);
    const { rows: leafRows } = await driver.query<{ bucket: number; digest: string | null }>(
      `select bucket, bit_xor(hash)::text as digest from ${table} where hash is not null group by bucket`,
    );
    const ours = buildTree(leavesFrom(leafRows));

    // Down the tree: at each level ask for the nodes under the ones that differed.
    let nodes = [0];
    const differingNodes: number[] = [];
    for (let level = 0; level <= digestTree.depth && nodes.length > 0; level++) {
      const requests: ReplicaRequest[] = chunks(nodes, this.#options.maxNodesPerRequest).map((part) => ({
        kind: 'digest',
        requestId: newId(),
        replica: this.name,
        checkId,
        level,
        nodes: part,
      }));
      entries += nodes.length;
      const differing: number[] = [];
      for (const parts of await this.#ask(requests, traffic)) {
        for (const reply of parts) {
          if (reply.kind !== 'digest') continue;
          for (const [node, hash] of Object.entries(reply.hashes)) {
            entries++;
            if (ours[level]![Number(node)] !== hash) differing.push(Number(node));
          }
        }
      }
      differing.sort((a, b) => a - b);
      differingNodes.push(differing.length);
      nodes = level < digestTree.depth ? differing.flatMap(childrenOf) : differing;
      if (level === digestTree.depth) break;
    }
    const leaves = differingNodes.length === digestTree.depth + 1 ? nodes : [];

    // The keys of the differing leaves: the source answers with the state of every key that differs.
    const listed = new Map<string, string>();
    const missing: StateRow[] = [];
    const different: StateRow[] = [];
    const extra: string[] = [];
    if (leaves.length > 0) {
      const { rows } = await driver.query<{ key: string; bucket: number; hash: string }>(
        `select key, bucket, hash::text as hash from ${table} where bucket = any($1::int[]) and hash is not null order by bucket, key`,
        [leaves],
      );
      const byLeaf = new Map<number, Array<[string, string]>>(leaves.map((leaf) => [leaf, []]));
      for (const row of rows) {
        listed.set(row.key, row.hash);
        byLeaf.get(Number(row.bucket))!.push([row.key, row.hash]);
      }
      // Whole leaves per request, as many as fit in maxKeysPerRequest keys.
      const requests: ReplicaRequest[] = [];
      let group: number[] = [];
      let keys: Array<[string, string]> = [];
      const flush = () => {
        if (group.length === 0) return;
        requests.push({ kind: 'keys', requestId: newId(), replica: this.name, checkId, leaves: group, keys });
        group = [];
        keys = [];
      };
      for (const [leaf, leafKeys] of byLeaf) {
        if (group.length > 0 && keys.length + leafKeys.length > this.#options.maxKeysPerRequest) flush();
        group.push(leaf);
        keys.push(...leafKeys);
      }
      flush();
      entries += listed.size + leaves.length;
      for (const parts of await this.#ask(requests, traffic)) {
        for (const reply of parts) {
          if (reply.kind !== 'keys') continue;
          entries += reply.rows.length + reply.absent.length;
          for (const row of reply.rows) (listed.has(row.key) ? different : missing).push(row);
          extra.push(...reply.absent);
        }
      }
    }

    let repaired = 0;
    if (options.repair !== false && missing.length + different.length + extra.length > 0) {
      repaired = await this.#repair(meta.generation, [...missing, ...different], extra, listed);
    }
    const sample = (keys: readonly string[]) => keys.slice(0, 10);
    const report: DriftReport = {
      ...base,
      durationMs: Date.now() - started,
      missing: missing.length,
      extra: extra.length,
      different: different.length,
      repaired,
      samples: { missing: sample(missing.map((row) => row.key)), extra: sample(extra), different: sample(different.map((row) => row.key)) },
      messages: { ...traffic },
      entries,
      differingNodes,
    };
    this.#counts.checks++;
    this.#counts.repaired += repaired;
    await this.#record(report);
    return report;
  }

  async #record(report: DriftReport): Promise<void> {
    this.#lastCheck = report;
    await this.#driver.query(`update ${this.#meta} set last_check = $2::jsonb, checked_at = now() where name = $1`, [this.name, JSON.stringify(report)]);
  }

  /**
   * Writes the source's state over rows that are still as the check listed them. A row a live event changed
   * since is left alone: the event is newer than, or as new as, what the source sent.
   */
  async #repair(generation: number, rows: readonly StateRow[], absent: readonly string[], listed: ReadonlyMap<string, string>): Promise<number> {
    const table = this.#table(generation);
    const written: Array<[string, Entry<Row>]> = [];
    await this.#bus.transaction(async (tx) => {
      for (const row of rows) {
        const result = await tx.query(
          `insert into ${table} as t (key, version, state, event_time) values ($1, $2, $3::jsonb, null)
           on conflict (key) do update set version = excluded.version, state = excluded.state, updated_at = now()
            where t.hash is not distinct from $4::int8`,
          [row.key, row.version, JSON.stringify(row.state), listed.get(row.key) ?? null],
        );
        if ((result.rowCount ?? 0) > 0) written.push([row.key, { version: row.version, row: row.state as Row }]);
      }
      for (const key of absent) {
        // A tombstone at the row's own version: an older upsert still in flight cannot bring it back.
        const result = await tx.query<{ version: string | number }>(`update ${table} set state = null, updated_at = now() where key = $1 and hash = $2::int8 returning version`, [
          key,
          listed.get(key) ?? null,
        ]);
        const version = result.rows[0]?.version;
        if (version !== undefined) written.push([key, { version: Number(version), row: null }]);
      }
    });
    for (const [key, entry] of written) this.#remember(key, entry, true);
    return written.length;
  }

  /**
   * Fills a fresh table from the source's state (pages over the bus) and switches readers to it in one
   * transaction; events arriving meanwhile are applied to both tables, so none is lost at the switch.
   * Readers see the old table, whole, until the switch.
   */
  rebuild(options: { onProgress?: (progress: RebuildProgress) => void } = {}): Promise<RebuildReport> {
    if (this.#rebuilding !== undefined) {
      return Promise.reject(new TidingsError('SUBSCRIPTION_CONFLICT', `Replica ${this.name}: a rebuild is already running in this process; wait for it (tidings drift status shows the generation being built)`));
    }
    const running = this.#rebuild(options).finally(() => {
      this.#rebuilding = undefined;
    });
    this.#rebuilding = running;
    return running;
  }

  /**
   * A rebuild asked for over the bus (tidings replica rebuild): its progress, then its report or error,
   * recorded in the meta row under the request's id, at most every 100 ms until the end.
   */
  async #rebuildOnRequest(rebuildId: string): Promise<void> {
    const record = (value: Record<string, unknown>) =>
      this.#driver.query(`update ${this.#meta} set rebuild = $2::jsonb where name = $1`, [this.name, JSON.stringify({ rebuildId, at: new Date().toISOString(), ...value })]);
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
      await record({ state: 'failed', error: error instanceof Error ? error.message : String(error) }).catch(() => undefined);
    }
  }

  async #rebuild(options: { onProgress?: (progress: RebuildProgress) => void }): Promise<RebuildReport> {
    await this.ready();
    const started = Date.now();
    const traffic = { sent: 0, received: 0 };
    const next = await this.#bus.transaction(async (tx) => {
      const meta = await this.#readMeta(tx, true);
      if (meta.building !== null) {
        // A rebuild that died half-way (its process stopped): start that table again.
        await tx.query(`drop table if exists ${this.#table(meta.building)}`);
        await tx.query(`drop function if exists ${this.#applyFunction(meta.building)}`);
      }
      const generation = Math.max(meta.generation, meta.building ?? 0) + 1;
      await this.#createGeneration(tx, generation);
      await tx.query(`update ${this.#meta} set building = $2 where name = $1`, [this.name, generation]);
      return generation;
    });
    this.#known = undefined;
    let done = 0;
    let total: number | null = null;
    let after: string | null = null;
    try {
      for (;;) {
        const [parts] = await this.#ask([{ kind: 'page', requestId: newId(), replica: this.name, after, limit: this.#options.pageSize }], traffic);
        const rows = parts!.flatMap((reply) => (reply.kind === 'page' ? reply.rows : []));
        if (after === null) total = parts![0]?.kind === 'page' ? parts![0].total : null;
        if (rows.length > 0) {
          // Guarded like events: a live event already applied to the new table is newer than the page. A
          // batch of live events holding some of these keys can deadlock with it: the page is idempotent,
          // so it is the one that tries again.
          await retryConflicts(() => this.#driver.query(
            `insert into ${this.#table(next)} as t (key, version, state, event_time)
             select r.key, r.version, r.state, null from jsonb_to_recordset($1::jsonb) as r(key text, version int8, state jsonb)
             on conflict (key) do update set version = excluded.version, state = excluded.state, updated_at = now()
              where t.version < excluded.version`,
            [JSON.stringify(rows)],
          ));
          done += rows.length;
          after = rows[rows.length - 1]!.key;
        }
        options.onProgress?.({ done, total });
        if (rows.length < this.#options.pageSize) break;
      }
      await this.#bus.transaction(async (tx) => {
        const meta = await this.#readMeta(tx, true);
        if (meta.building !== next) throw new TidingsError('SUBSCRIPTION_CONFLICT', `Replica ${this.name}: another rebuild (generation ${meta.building}) took over this one (generation ${next}); let it finish`);
        await this.#point(tx, next);
        await tx.query(`update ${this.#meta} set generation = $2, building = null, filled_at = coalesce(filled_at, now()), rebuilt_at = now() where name = $1`, [this.name, next]);
        // Handlers still writing the old table hold it until they commit; a handler that read the old
        // generation and writes after this commit fails, is retried, and reads the new one.
        await tx.query(`drop table ${this.#table(meta.generation)}`);
        await tx.query(`drop function if exists ${this.#applyFunction(meta.generation)}`);
      });
      this.#known = undefined;
    } catch (error) {
      this.#known = undefined;
      await this.#driver.query(`update ${this.#meta} set building = null where name = $1 and building = $2`, [this.name, next]).catch(() => undefined);
      await this.#driver.query(`drop table if exists ${this.#table(next)}`).catch(() => undefined);
      await this.#driver.query(`drop function if exists ${this.#applyFunction(next)}`).catch(() => undefined);
      throw error;
    }
    if (this.#options.memory) await this.#reload();
    this.#counts.rebuilds++;
    return { replica: this.name, generation: next, rows: done, durationMs: Date.now() - started, messages: traffic };
  }
}

/** Runs `fn` again after a deadlock or serialization failure (up to 10 times): for idempotent writes only. */
async function retryConflicts<T>(fn: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (error) {
      const code = ((error as { cause?: { code?: unknown } }).cause ?? (error as { code?: unknown }))?.code;
      if (attempt >= 10 || (code !== '40P01' && code !== '40001')) throw error;
      await new Promise((resolve) => setTimeout(resolve, attempt * 20 * Math.random()));
    }
  }
}

/** Runs a replica of `definition` on `bus`: subscribes its feeds and returns the reader. */
export function replica<Row>(bus: Bus<PgTransaction>, definition: ReplicaDefinition<Row>, options: ReplicaOptions = {}): Replica<Row> {
  return new Replica(bus, definition, options);
}
