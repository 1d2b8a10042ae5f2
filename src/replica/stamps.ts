/**
 * A replica on a backbone per tenant (tidings/stamps): one replica per stamp, its tables in the stamp's
 * schema, filled by the feed handled in that stamp (the bus's subscriptions run in every stamp) and asking
 * the source in that stamp. A call goes to the current tenant's stamp: `bus.withTenant`'s, the handled
 * message's, or `{ tenant }`. What sums up (stats, staleness, caughtUp, and a drift check or rebuild outside
 * any tenant) covers every stamp and names each stamp's part by tenant. A stamp added at run time gets its
 * replica's tables before it is used; a stamp removed stops its replica; a stamp that is down holds up its
 * own tenant's replica only. docs/replicas.md, "Tenants"; test/replica-stamps.pg.test.ts.
 */
import type { Backbone } from '../core/backbone.ts';
import type { Bus } from '../core/bus.ts';
import { newId } from '../core/envelope.ts';
import { errorMessage, TidingsError } from '../core/errors.ts';
import { checkTenant, currentTenant } from '../core/tenant.ts';
import { PostgresBackbone } from '../postgres/backbone.ts';
import type { PgTransaction } from '../postgres/transaction.ts';
import type { TenantStamps } from '../stamps/backbone.ts';
import type { DriftReport, RebuildProgress, RebuildReport, ReplicaDefinition, ReplicaStats, Staleness } from './define.ts';
import type { ReadScope, Replica, ReplicaSettings, SchemaReplica } from './replica.ts';

/** How the stamps' replicas are made and fed: given by replica(), so that this file needs nothing of replica.ts at run time. */
export interface StampReplicaParts<Row> {
  /** One stamp's replica, in the stamp's open backbone. */
  make(backbone: PostgresBackbone, tenant: string): SchemaReplica<Row>;
  /** Declares the replica's subscriptions on the bus, each message going to the replica `route` names for its tenant. */
  subscribe(route: (tenant: string | undefined) => SchemaReplica<Row>): void;
}

export class StampReplicas<Row> implements Replica<Row> {
  readonly name: string;
  readonly definition: ReplicaDefinition<Row>;
  readonly #bus: Bus<PgTransaction>;
  readonly #stamps: TenantStamps<PgTransaction>;
  readonly #settings: ReplicaSettings;
  readonly #make: StampReplicaParts<Row>['make'];
  /** Each open stamp's replica by tenant, with the backbone it was made in (a stamp added again has a new one). */
  readonly #replicas = new Map<string, { readonly replica: SchemaReplica<Row>; readonly backbone: PostgresBackbone }>();
  /** The replicas started (once each): start() may meet a stamp opening at the same moment. */
  readonly #running = new WeakSet<SchemaReplica<Row>>();
  /** Why a stamp cannot hold this replica, once one was found that is not PostgreSQL. */
  #refused: TidingsError | undefined;
  /** start() was called (and not stop()): a stamp opening later starts its replica too. */
  #started = false;

  constructor(
    bus: Bus<PgTransaction>,
    stamps: TenantStamps<PgTransaction>,
    definition: ReplicaDefinition<Row>,
    settings: ReplicaSettings,
    parts: StampReplicaParts<Row>,
  ) {
    this.name = settings.name;
    this.definition = definition;
    this.#bus = bus;
    this.#stamps = stamps;
    this.#settings = settings;
    this.#make = parts.make;
    // The stamps made so far are checked now; those made later, as they open.
    for (const tenant of stamps.tenants()) this.#checkKind(tenant, stamps.stamp(tenant));
    parts.subscribe((tenant) => this.#replicaOf(tenant ?? '', 'its feed'));
    stamps.onStamp({ opened: (tenant, backbone) => this.#opened(tenant, backbone), removed: (tenant) => this.#removed(tenant) });
  }

  /** The tenants whose stamp holds this replica now (their stamps opened, its tables made), in the stamps' order. */
  tenants(): string[] {
    return this.#open().map(([tenant]) => tenant);
  }

  /** The replica in `tenant`'s stamp, for what only it tells (its schema, its stats); TENANT_UNKNOWN if no stamp. */
  stamp(tenant: string): SchemaReplica<Row> {
    return this.#replicaOf(checkTenant(tenant, `Replica ${this.name}: stamp()`), 'stamp()');
  }

  /** The current tenant's stamp's schema (TENANT_REQUIRED outside a tenant's scope). */
  get schema(): string {
    return this.#replicaOf(this.#tenant({}, 'schema'), 'schema').schema;
  }

  /** The current tenant's stamp's view (TENANT_REQUIRED outside a tenant's scope). */
  get view(): string {
    return this.#replicaOf(this.#tenant({}, 'view'), 'view').view;
  }

  // ---- reading: the tenant's stamp --------------------------------------------------------------------

  async get(key: string, options: ReadScope = {}): Promise<Row | undefined> {
    const tenant = this.#tenant(options, `get(${JSON.stringify(key)})`);
    return (await this.#reach(tenant, 'get')).get(key, { tenant });
  }

  lookup(index: string, value: string, options: ReadScope = {}): Row | undefined {
    const tenant = this.#tenant(options, `lookup(${JSON.stringify(index)})`);
    return this.#replicaOf(tenant, 'lookup').lookup(index, value, { tenant });
  }

  async query(where = 'true', params: readonly unknown[] = [], options: ReadScope & { limit?: number; orderBy?: string } = {}): Promise<Row[]> {
    const tenant = this.#tenant(options, 'query()');
    return (await this.#reach(tenant, 'query')).query(where, params, { ...options, tenant });
  }

  // ---- what sums up: the tenant's stamp, else every stamp ----------------------------------------------

  /** The current tenant's stamp's replica ready; outside a tenant's scope, every open stamp's. */
  async ready(): Promise<void> {
    const tenant = currentTenant();
    if (tenant !== undefined) return (await this.#reach(tenant, 'ready')).ready();
    await this.#each('preparing the tables', (replica) => replica.ready());
  }

  /**
   * The current tenant's stamp's staleness; outside a tenant's scope, every stamp's together: the lags
   * summed, the newest event applied in any stamp (as one replica of every tenant's rows would say).
   * `stalenessByTenant()` has each stamp's.
   */
  async staleness(): Promise<Staleness> {
    const tenant = currentTenant();
    if (tenant !== undefined) return (await this.#reach(tenant, 'staleness')).staleness();
    const each = Object.values(await this.stalenessByTenant());
    const newest = each.reduce<Staleness | undefined>(
      (a, b) => (a?.newestEventAt == null || (b.newestEventAt !== null && b.newestEventAt > a.newestEventAt) ? b : a),
      undefined,
    );
    return { lag: sumOf(each, (s) => s.lag), newestEventAt: newest?.newestEventAt ?? null, ageMs: newest?.ageMs ?? null };
  }

  /** Each open stamp's staleness, by tenant. */
  stalenessByTenant(): Promise<Record<string, Staleness>> {
    return this.#each('reading the staleness', (replica) => replica.staleness());
  }

  /** Waits until the current tenant's stamp's replica (outside a tenant's scope: every open stamp's) has applied every committed event. */
  async caughtUp(timeoutMs = 60_000): Promise<void> {
    const tenant = currentTenant();
    if (tenant !== undefined) return (await this.#reach(tenant, 'caughtUp')).caughtUp(timeoutMs);
    await this.#each('catching up', (replica) => replica.caughtUp(timeoutMs));
  }

  /** Every stamp's counts summed; `lastCheck` is the latest check of any stamp (it names its tenant). `statsByTenant()` has each stamp's. */
  stats(): ReplicaStats {
    const each = Object.values(this.statsByTenant());
    const sum = (count: (stats: ReplicaStats) => number) => sumOf(each, count);
    const checks = each.flatMap((stats) => (stats.lastCheck === null ? [] : [stats.lastCheck]));
    return {
      applied: sum((s) => s.applied),
      stale: sum((s) => s.stale),
      deleted: sum((s) => s.deleted),
      checks: sum((s) => s.checks),
      repaired: sum((s) => s.repaired),
      rebuilds: sum((s) => s.rebuilds),
      lastCheck: checks.sort((a, b) => b.at.localeCompare(a.at))[0] ?? null,
      memoryRows: sum((s) => s.memoryRows),
    };
  }

  /** Each open stamp's counts, by tenant. */
  statsByTenant(): Record<string, ReplicaStats> {
    return Object.fromEntries(this.#open().map(([tenant, replica]) => [tenant, replica.stats()]));
  }

  // ---- lifecycle ----------------------------------------------------------------------------------------

  /**
   * Starts every open stamp's replica (tables, memory, bootstrap, periodic drift checks, each stamp on its
   * own), and those of stamps opening later. A stamp's replica that cannot start is reported (onWarning)
   * while the others run; this rejects only if none could. Call after `bus.start()`.
   */
  async start(): Promise<void> {
    this.#started = true;
    const replicas = this.#open();
    const started = await Promise.allSettled(replicas.map(([, replica]) => this.#start(replica)));
    const failed = replicas.flatMap(([tenant], i) => {
      const result = started[i]!;
      return result.status === 'rejected' ? [[tenant, result.reason] as const] : [];
    });
    if (failed.length > 0 && failed.length === replicas.length) throw failed[0]![1];
    for (const [tenant, error] of failed)
      this.#settings.warn(`Replica ${this.name}: could not start in tenant ${tenant}'s stamp; the other stamps' replicas run`, error);
  }

  /** Stops every stamp's periodic checks and fails requests still waiting. Call before `bus.stop()`. */
  stop(): void {
    this.#started = false;
    for (const { replica } of this.#replicas.values()) {
      replica.stop();
      this.#running.delete(replica);
    }
  }

  // ---- drift and rebuild: per stamp ----------------------------------------------------------------------

  /**
   * Compares the replica with the source and repairs what differs, in the current tenant's stamp (or
   * `tenant`'s): each stamp's replica with the source's data in that stamp. Outside a tenant's scope, in
   * every open stamp at once, under one check id: the report sums theirs, `byTenant` has each one.
   */
  async checkDrift(options: { checkId?: string; repair?: boolean; tenant?: string } = {}): Promise<DriftReport> {
    const { tenant: named, ...check } = options;
    const tenant = named === undefined ? currentTenant() : checkTenant(named, `Replica ${this.name}: checkDrift`);
    if (tenant !== undefined) return (await this.#reach(tenant, 'checkDrift')).checkDrift(check);
    const started = Date.now();
    const checkId = check.checkId ?? newId();
    const byTenant = await this.#each('a drift check', (replica) => replica.checkDrift({ ...check, checkId }));
    return sumDrift(this.name, checkId, started, byTenant);
  }

  /**
   * Rebuilds the current tenant's stamp's replica (or `tenant`'s) from the source's state in that stamp.
   * Outside a tenant's scope, every open stamp's, one after the other (progress counts rows over the stamps
   * done so far, `total` null): the report sums theirs, `byTenant` has each one.
   */
  async rebuild(options: { onProgress?: (progress: RebuildProgress) => void; tenant?: string } = {}): Promise<RebuildReport> {
    const { tenant: named, onProgress } = options;
    const tenant = named === undefined ? currentTenant() : checkTenant(named, `Replica ${this.name}: rebuild`);
    if (tenant !== undefined) return (await this.#reach(tenant, 'rebuild')).rebuild(onProgress === undefined ? {} : { onProgress });
    const started = Date.now();
    let before = 0;
    const byTenant = await this.#each(
      'a rebuild',
      async (replica) => {
        const report = await replica.rebuild({ onProgress: (progress) => onProgress?.({ done: before + progress.done, total: null }) });
        before += report.rows;
        return report;
      },
      true,
    );
    const reports = Object.values(byTenant);
    return {
      replica: this.name,
      generation: Math.max(0, ...reports.map((report) => report.generation)),
      rows: sumOf(reports, (report) => report.rows),
      durationMs: Date.now() - started,
      messages: { sent: sumOf(reports, (report) => report.messages.sent), received: sumOf(reports, (report) => report.messages.received) },
      byTenant,
    };
  }

  // ---- the stamps ------------------------------------------------------------------------------------------

  /** A stamp opened: its replica is made (again, if its backbone is new) and its tables prepared before the stamp is used. */
  async #opened(tenant: string, backbone: Backbone<PgTransaction>): Promise<void> {
    const own = this.#checkKind(tenant, backbone);
    let entry = this.#replicas.get(tenant);
    if (entry?.backbone !== own) {
      entry?.replica.stop();
      entry = { replica: this.#make(own, tenant), backbone: own };
      this.#replicas.set(tenant, entry);
    }
    const { replica } = entry;
    const preparing = replica.ready();
    // Not awaited: a start may ask the source (bootstrap: 'transfer'), publishing to this stamp, which waits
    // until the stamp is up, that is until this listener has returned. It prepares the tables again if need be.
    if (this.#started) {
      void preparing
        .catch(() => undefined)
        .then(() => this.#start(replica))
        .catch((error: unknown) =>
          this.#settings.warn(`Replica ${this.name}: could not start in tenant ${tenant}'s stamp; the other stamps' replicas run`, error),
        );
    }
    await preparing;
  }

  /** A stamp removed: its replica stops (its tables stay in the stamp, with the stamp's other data). */
  #removed(tenant: string): void {
    this.#replicas.get(tenant)?.replica.stop();
    this.#replicas.delete(tenant);
  }

  #start(replica: SchemaReplica<Row>): Promise<void> {
    if (this.#running.has(replica)) return Promise.resolve();
    this.#running.add(replica);
    return replica.start().catch((error: unknown) => {
      this.#running.delete(replica);
      throw error;
    });
  }

  /** The stamp's backbone, if PostgreSQL: a replica keeps its tables in each stamp's database. */
  #checkKind(tenant: string, backbone: Backbone<PgTransaction>): PostgresBackbone {
    if (backbone instanceof PostgresBackbone) return backbone;
    this.#refused = new TidingsError(
      'INVALID_OPTIONS',
      `Invalid options for replica ${this.name}: the stamp of tenant ${tenant} runs on the ${backbone.name} backbone, and a replica keeps its tables in each stamp's PostgreSQL database: run it on tenantStamps() whose stamps are postgres({ url, schema }), or on one postgres() backbone`,
    );
    throw this.#refused;
  }

  // ---- routing ------------------------------------------------------------------------------------------

  /** The tenant a call is for: the one named, else the code's (withTenant, or the message being handled). */
  #tenant(options: ReadScope, what: string): string {
    if (options.tenant !== undefined) return checkTenant(options.tenant, `Replica ${this.name}`);
    const tenant = currentTenant();
    if (tenant !== undefined) return tenant;
    throw new TidingsError(
      'TENANT_REQUIRED',
      `Replica ${this.name}: ${what} needs a tenant: on a backbone per tenant each tenant's rows are in its own stamp's replica. Call it inside bus.withTenant(tenant, fn) (or a handler of the tenant's message), or pass { tenant }`,
    );
  }

  /** Each open stamp's replica with its tenant, in the stamps' order (a stamp opens when it can, not in turn). */
  #open(): Array<readonly [string, SchemaReplica<Row>]> {
    return this.#stamps.tenants().flatMap((tenant) => {
      const entry = this.#replicas.get(tenant);
      return entry === undefined ? [] : [[tenant, entry.replica] as const];
    });
  }

  /** The replica of `tenant`'s stamp: TENANT_UNKNOWN if it has none, BACKBONE_UNAVAILABLE while it is not open. */
  #replicaOf(tenant: string, what: string): SchemaReplica<Row> {
    if (this.#refused !== undefined) throw this.#refused;
    const entry = this.#replicas.get(tenant);
    if (entry !== undefined) return entry.replica;
    const known = this.#stamps.tenants();
    if (!known.includes(tenant)) {
      throw new TidingsError(
        'TENANT_UNKNOWN',
        `Replica ${this.name}, ${what}: tenant ${tenant} has no stamp (the stamps are ${known.length === 0 ? 'none yet: is the bus started?' : known.join(', ')}). Add it with backbone.addTenant('${tenant}'), or list it in tenantStamps({ tenants })`,
      );
    }
    throw new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `Replica ${this.name}, ${what}: the stamp of tenant ${tenant} is not open (the bus is not started, or the stamp is down: see bus.health()); its replica is made when it opens. The other tenants' replicas are not affected`,
      { retryable: true },
    );
  }

  /** Like #replicaOf, opening the stamp first if it is not (the bus not started yet, or the stamp down and due a new try). */
  async #reach(tenant: string, what: string): Promise<SchemaReplica<Row>> {
    if (!this.#replicas.has(tenant) && this.#refused === undefined && this.#stamps.tenants().includes(tenant)) {
      // A transaction of the tenant's stamp opens it, and its replica with it, or says why it cannot.
      await this.#bus.withTenant(tenant, () => this.#bus.transaction(async () => undefined));
    }
    return this.#replicaOf(tenant, what);
  }

  /**
   * Runs `fn` on every open stamp's replica (at once, or `oneByOne`), each stamp on its own: one that fails
   * does not stop the others, and the error names the tenants that failed and those done.
   */
  async #each<T>(what: string, fn: (replica: SchemaReplica<Row>) => Promise<T>, oneByOne = false): Promise<Record<string, T>> {
    const replicas = this.#open();
    const settled: PromiseSettledResult<T>[] = [];
    if (oneByOne) for (const [, replica] of replicas) settled.push(...(await Promise.allSettled([fn(replica)])));
    else settled.push(...(await Promise.allSettled(replicas.map(([, replica]) => fn(replica)))));
    const results: Record<string, T> = {};
    const failed: Array<[string, unknown]> = [];
    replicas.forEach(([tenant], i) => {
      const result = settled[i]!;
      if (result.status === 'fulfilled') results[tenant] = result.value;
      else failed.push([tenant, result.reason]);
    });
    if (failed.length === 0) return results;
    const cause = failed[0]![1];
    throw new TidingsError(
      cause instanceof TidingsError ? cause.code : 'BACKBONE_UNAVAILABLE',
      `Replica ${this.name}: ${what} failed in the stamp of ${failed.map(([tenant, error]) => `tenant ${tenant} (${errorMessage(error)})`).join(', ')}; ${Object.keys(results).join(', ') || 'no other tenant'} went through. Run it for one tenant with { tenant }, or inside bus.withTenant(tenant, fn)`,
      { cause, retryable: true },
    );
  }
}

/** Every stamp's drift report as one: the counts summed, the first samples of each, and each stamp's report by tenant. */
function sumDrift(replica: string, checkId: string, started: number, byTenant: Record<string, DriftReport>): DriftReport {
  const reports = Object.values(byTenant);
  const sum = (count: (report: DriftReport) => number) => sumOf(reports, count);
  const samples = (kind: keyof DriftReport['samples']) => reports.flatMap((report) => report.samples[kind]).slice(0, 10);
  const differingNodes: number[] = [];
  for (const report of reports) {
    for (const [level, n] of report.differingNodes.entries()) differingNodes[level] = (differingNodes[level] ?? 0) + n;
  }
  // Skipped only if no stamp checked; a stamp that skipped shows it in its own report.
  const skipped = reports.length > 0 && reports.every((report) => report.skipped !== undefined);
  return {
    checkId,
    replica,
    at: new Date(started).toISOString(),
    durationMs: Date.now() - started,
    missing: sum((r) => r.missing),
    extra: sum((r) => r.extra),
    different: sum((r) => r.different),
    repaired: sum((r) => r.repaired),
    samples: { missing: samples('missing'), extra: samples('extra'), different: samples('different') },
    messages: { sent: sum((r) => r.messages.sent), received: sum((r) => r.messages.received) },
    entries: sum((r) => r.entries),
    differingNodes,
    ...(skipped
      ? {
          skipped: Object.entries(byTenant)
            .map(([tenant, report]) => `${tenant}: ${report.skipped}`)
            .join('; '),
        }
      : {}),
    byTenant,
  };
}

/** The sum of `count` over `items`: the stamps' parts of what sums up. */
function sumOf<T>(items: readonly T[], count: (item: T) => number): number {
  return items.reduce((n, item) => n + count(item), 0);
}
