import { TidingsError } from '../core/errors.ts';
import { identity, type Entry } from './store.ts';

/**
 * A replica's rows in memory (`memory: true`), with its secondary indexes: `get` and `lookup` answer
 * without a query. It runs ahead of the table by at most the batch being acknowledged (a batch rolled back
 * is handled again and writes the same rows). Rows are kept by tenant and key, like the table's.
 */
export class RowCache<Row> {
  /** By identity (tenant and key). */
  readonly #rows = new Map<string, Entry<Row>>();
  /** The tenants holding each key ('' for none): a read outside any tenant's scope finds a key's row through it. */
  readonly #tenants = new Map<string, Set<string>>();
  /** Per index: the key holding each value, per tenant (value -> tenant -> key). */
  readonly #indexes = new Map<string, Map<string, Map<string, string>>>();
  /** Set while the rows are reloaded: updates meanwhile are replayed onto the new map. */
  #reloading: Array<[string, Entry<Row>]> | undefined;

  constructor(
    private readonly replica: string,
    private readonly indexes: Readonly<Record<string, (row: Row) => string>>,
  ) {
    for (const name of Object.keys(indexes)) this.#indexes.set(name, new Map());
  }

  get size(): number {
    return this.#rows.size;
  }

  hasIndex(name: string): boolean {
    return this.#indexes.has(name);
  }

  /** The row of `key` for `tenant` ('' for none); with `tenant` undefined, of whichever tenant holds it (ambiguous if several). */
  get(key: string, tenant: string | undefined): Row | undefined {
    if (tenant !== undefined) return this.#rows.get(identity(tenant, key))?.row ?? undefined;
    const live = [...(this.#tenants.get(key) ?? [])].filter((t) => this.#rows.get(identity(t, key))?.row != null);
    if (live.length > 1) throw ambiguous(this.replica, `key ${key}`, live);
    return live.length === 0 ? undefined : this.get(key, live[0]!);
  }

  lookup(index: string, value: string, tenant: string | undefined): Row | undefined {
    const holders = this.#indexes.get(index)?.get(value);
    if (holders === undefined) return undefined;
    if (tenant === undefined && holders.size > 1) throw ambiguous(this.replica, `${index} ${value}`, [...holders.keys()]);
    const [holder, key] = tenant === undefined ? [...holders][0]! : [tenant, holders.get(tenant)];
    return key === undefined ? undefined : this.get(key, holder);
  }

  /** Puts an entry in memory if it is newer (or `force`: a repair, a reload), keeping the indexes in step. */
  remember(key: string, entry: Entry<Row>, force = false): void {
    this.#reloading?.push([key, entry]);
    const id = identity(entry.tenant, key);
    const old = this.#rows.get(id);
    if (!force && old !== undefined && old.version >= entry.version) return;
    for (const [name, index] of this.#indexes) {
      const fn = this.indexes[name]!;
      if (old?.row != null) {
        const holders = index.get(fn(old.row));
        if (holders?.get(entry.tenant) === key) holders.delete(entry.tenant);
        if (holders?.size === 0) index.delete(fn(old.row));
      }
      if (entry.row !== null) {
        const value = fn(entry.row);
        let holders = index.get(value);
        if (holders === undefined) index.set(value, (holders = new Map()));
        holders.set(entry.tenant, key);
      }
    }
    this.#rows.set(id, entry);
    let tenants = this.#tenants.get(key);
    if (tenants === undefined) this.#tenants.set(key, (tenants = new Set()));
    tenants.add(entry.tenant);
  }

  /**
   * From now on, what is remembered is kept for the next `reload`, as if it came while that reload read: a
   * rebuild starts it before it fills the new table, so that rows applied while it runs, and committed
   * only after the reload's read, are not lost to memory.
   */
  capture(): void {
    this.#reloading ??= [];
  }

  /** Stops a capture with no reload after it (a rebuild that failed). */
  release(): void {
    this.#reloading = undefined;
  }

  /**
   * Replaces every row with what `read` returns; entries remembered while it reads (or since `capture`) win if
   * newer, and so does a row memory already holds at a newer version than the table's: memory runs ahead of
   * the table by the batch being acknowledged, whose commit may come after the read's snapshot.
   */
  async reload(read: () => Promise<Array<[string, Entry<Row>]>>): Promise<void> {
    this.#reloading ??= [];
    try {
      const fresh = new Map((await read()).map(([key, entry]) => [identity(entry.tenant, key), [key, entry] as [string, Entry<Row>]]));
      for (const [id, [key, entry]] of fresh) {
        const held = this.#rows.get(id);
        if (held !== undefined && held.version > entry.version) fresh.set(id, [key, held]);
      }
      for (const [key, entry] of this.#reloading) {
        const have = fresh.get(identity(entry.tenant, key));
        if (have === undefined || have[1].version < entry.version) fresh.set(identity(entry.tenant, key), [key, entry]);
      }
      this.#rows.clear();
      this.#tenants.clear();
      for (const index of this.#indexes.values()) index.clear();
      for (const [key, entry] of fresh.values()) this.remember(key, entry, true);
    } finally {
      this.#reloading = undefined;
    }
  }
}

/** A read outside any tenant's scope that finds rows of several tenants. */
export function ambiguous(replica: string, what: string, tenants: readonly string[]): TidingsError {
  return new TidingsError(
    'TENANT_REQUIRED',
    `Replica ${replica}: ${what} is held by tenants ${tenants.map((t) => (t === '' ? '(none)' : t)).join(', ')}; read inside bus.withTenant(tenant, fn) or pass { tenant }`,
  );
}
