import { TidingsError } from '../core/errors.ts';
import type { Queryable, SqlDriver } from '../postgres/connection/driver.ts';
import type { PgTransaction } from '../postgres/transaction.ts';
import type { StateRow } from './protocol.ts';
import type { SourceRequests } from './requests.ts';
import { generationStatements, metaStatements, replicaBase, type GenerationStatements, type MetaStatements } from './sql.ts';

/** Where a replica is: the generation readers see, the one a rebuild fills, and whether it was ever filled. */
interface Meta {
  generation: number;
  building: number | null;
  filled: boolean;
}

/** What a drift check and a rebuild need of their replica: its tables, its source's answers, a bus transaction. */
export interface ReplicaParts<Row> {
  readonly name: string;
  /** The stamp's tenant, for a replica in one stamp of a backbone per tenant: its reports name it. */
  readonly tenant?: string | undefined;
  readonly store: ReplicaStore<Row>;
  readonly requests: SourceRequests;
  readonly transaction: <T>(fn: (tx: PgTransaction) => Promise<T>) => Promise<T>;
}

/** A row as the replica keeps it: its tenant ('' for none), the source's version of the key, and its state (null: a tombstone). */
export interface Entry<Row> {
  tenant: string;
  version: number;
  row: Row | null;
}

/** A row's identity in memory and in a check's lists: its tenant and key (a tenant id holds no control character). */
export function identity(tenant: string, key: string): string {
  return `${tenant}\u0000${key}`;
}

/**
 * A replica's tables: its row in `replicas` (migration 006), one table per generation with the function
 * that applies an event to it, and the view readers query. It remembers the generations it last read and
 * checks them with every write, so a rebuild started or switched by any process is seen by the next event.
 */
export class ReplicaStore<Row> {
  readonly meta: MetaStatements;
  readonly tables: GenerationStatements;
  /** The generations this process last read from the meta row; every write verifies them (see #write). */
  #known: Meta | undefined;

  constructor(
    readonly driver: SqlDriver,
    /** The Tidings schema: the `replicas` table, and this replica's tables and view. */
    readonly schema: string,
    readonly name: string,
    private readonly source: string,
  ) {
    this.meta = metaStatements(schema);
    this.tables = generationStatements(schema, replicaBase(name), name, this.meta.meta);
  }

  /** Creates the replica's row and its current generation's table and view, whoever comes first. */
  async prepare(tx: PgTransaction): Promise<void> {
    await tx.query(this.meta.lock, [`${this.schema}.${this.name}`]);
    await tx.query(this.meta.insert, [this.name, this.source]);
    const meta = await this.readMeta(tx);
    // A generation a rebuild was filling when its process stopped: brought up to date like the current one.
    if (meta.building !== null) await this.createGeneration(tx, meta.building, false);
    await this.createGeneration(tx, meta.generation, false);
    await tx.query(this.tables.point(meta.generation));
    await tx.query(this.tables.grants(meta.generation));
    if (meta.building !== null) await tx.query(this.tables.grants(meta.building));
  }

  /** Creates a generation's table and function (or brings an older one up to date); `grant`: once the view exists. */
  async createGeneration(q: Queryable, generation: number, grant = true): Promise<void> {
    for (const statement of this.tables.create(generation)) await q.query(statement);
    if (grant) await q.query(this.tables.grants(generation));
  }

  async dropGeneration(q: Queryable, generation: number): Promise<void> {
    for (const statement of this.tables.drop(generation)) await q.query(statement);
  }

  async readMeta(q: Queryable, lock = false): Promise<Meta> {
    const { rows } = await q.query<{ generation: number; building: number | null; filled_at: unknown }>(lock ? this.meta.readForUpdate : this.meta.read, [
      this.name,
    ]);
    const row = rows[0];
    if (row === undefined)
      throw new TidingsError('NOT_STARTED', `Replica ${this.name} has no tables yet in schema ${this.schema}: start its bus, or call replica.start()`);
    return { generation: Number(row.generation), building: row.building === null ? null : Number(row.building), filled: row.filled_at !== null };
  }

  /** Forgets the generations known: the next write reads the meta row afresh. */
  forget(): void {
    this.#known = undefined;
  }

  async #generations(q: Queryable): Promise<Meta> {
    this.#known ??= await this.readMeta(q);
    return this.#known;
  }

  /** The key's current row, locked until `tx` ends, read in one statement with the meta row. */
  async readRow(tx: PgTransaction, tenant: string, key: string): Promise<{ version: number; state: Row | null } | undefined> {
    for (;;) {
      const known = await this.#generations(tx);
      const { rows } = await tx.query<{ generation: number; building: number | null; version: string | number | null; state: Row | null }>(
        this.tables.readRow(known.generation),
        [this.name, key, tenant],
      );
      const row = rows[0];
      if (row === undefined) throw this.#noMeta();
      if (Number(row.generation) === known.generation && (row.building === null ? null : Number(row.building)) === known.building) {
        return row.version === null ? undefined : { version: Number(row.version), state: row.state };
      }
      this.#known = undefined;
    }
  }

  /**
   * Writes a row unless the table has this key at this version or newer, in one statement (the generation's
   * apply function): into the current generation, and the one a rebuild fills, which gets every event too.
   * True if it wrote the current one.
   */
  async write(tx: PgTransaction, tenant: string, key: string, version: number, row: Row | null, time: Date | null): Promise<boolean> {
    for (;;) {
      const known = await this.#generations(tx);
      const { rows } = await tx.query<{ n: number }>(this.tables.apply(known.generation), [
        tenant,
        key,
        version,
        row === null ? null : JSON.stringify(row),
        time,
        known.building,
      ]);
      const n = Number(rows[0]?.n);
      if (n >= 0) return n > 0;
      if (n === -2) throw this.#noMeta();
      this.#known = undefined;
    }
  }

  /** Every row of the current generation, tombstones included (to fill the memory map). */
  async all(): Promise<Array<[string, Entry<Row>]>> {
    const { rows } = await this.driver.query<{ tenant: string; key: string; version: string | number; state: Row | null }>(
      this.tables.all((await this.readMeta(this.driver)).generation),
    );
    return rows.map((row) => [row.key, { tenant: row.tenant, version: Number(row.version), row: row.state }]);
  }

  async newest(): Promise<{ at: Date | null; now: Date }> {
    const { rows } = await this.driver.query<{ at: Date | string | null; now: Date | string }>(
      this.tables.newest((await this.readMeta(this.driver)).generation),
    );
    return { at: rows[0]?.at == null ? null : new Date(rows[0].at), now: new Date(rows[0]!.now) };
  }

  async recordCheck(report: object): Promise<void> {
    await this.driver.query(this.meta.recordCheck, [this.name, JSON.stringify(report)]);
  }

  async recordRebuild(value: object): Promise<void> {
    await this.driver.query(this.meta.recordRebuild, [this.name, JSON.stringify(value)]);
  }

  /**
   * Writes the source's state over rows that are still as a check listed them (`listed`: identity -> hash),
   * and tombstones over those the source lacks. A row a live event changed since is left alone: the event is
   * newer than, or as new as, what the source sent. Returns what it wrote.
   */
  async repair(
    tx: PgTransaction,
    generation: number,
    rows: readonly StateRow[],
    absent: readonly { readonly tenant: string; readonly key: string }[],
    listed: ReadonlyMap<string, string>,
  ): Promise<Array<[string, Entry<Row>]>> {
    const written: Array<[string, Entry<Row>]> = [];
    for (const row of rows) {
      const tenant = row.tenant ?? '';
      const result = await tx.query(this.tables.repairRow(generation), [
        tenant,
        row.key,
        row.version,
        JSON.stringify(row.state),
        listed.get(identity(tenant, row.key)) ?? null,
      ]);
      if ((result.rowCount ?? 0) > 0) written.push([row.key, { tenant, version: row.version, row: row.state as Row }]);
    }
    for (const { tenant, key } of absent) {
      const result = await tx.query<{ version: string | number }>(this.tables.repairAbsent(generation), [
        tenant,
        key,
        listed.get(identity(tenant, key)) ?? null,
      ]);
      const version = result.rows[0]?.version;
      if (version !== undefined) written.push([key, { tenant, version: Number(version), row: null }]);
    }
    return written;
  }

  #noMeta(): TidingsError {
    return new TidingsError('NOT_STARTED', `Replica ${this.name} has no meta row in ${this.meta.meta}: was its schema dropped while it ran?`);
  }
}
