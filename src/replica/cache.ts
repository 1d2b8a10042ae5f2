import type { Entry } from './store.ts';

/**
 * A replica's rows in memory (`memory: true`), with its secondary indexes: `get` and `lookup` answer
 * without a query. It runs ahead of the table by at most the batch being acknowledged (a batch rolled back
 * is handled again and writes the same rows).
 */
export class RowCache<Row> {
  readonly #rows = new Map<string, Entry<Row>>();
  readonly #indexes = new Map<string, Map<string, string>>();
  /** Set while the rows are reloaded: updates meanwhile are replayed onto the new map. */
  #reloading: Array<[string, Entry<Row>]> | undefined;

  constructor(private readonly indexes: Readonly<Record<string, (row: Row) => string>>) {
    for (const name of Object.keys(indexes)) this.#indexes.set(name, new Map());
  }

  get size(): number {
    return this.#rows.size;
  }

  hasIndex(name: string): boolean {
    return this.#indexes.has(name);
  }

  get(key: string): Row | undefined {
    return this.#rows.get(key)?.row ?? undefined;
  }

  lookup(index: string, value: string): Row | undefined {
    const key = this.#indexes.get(index)?.get(value);
    return key === undefined ? undefined : this.get(key);
  }

  /** Puts an entry in memory if it is newer (or `force`: a repair, a reload), keeping the indexes in step. */
  remember(key: string, entry: Entry<Row>, force = false): void {
    this.#reloading?.push([key, entry]);
    const old = this.#rows.get(key);
    if (!force && old !== undefined && old.version >= entry.version) return;
    for (const [name, index] of this.#indexes) {
      const fn = this.indexes[name]!;
      if (old?.row != null) {
        const value = fn(old.row);
        if (index.get(value) === key) index.delete(value);
      }
      if (entry.row !== null) index.set(fn(entry.row), key);
    }
    this.#rows.set(key, entry);
  }

  /** Replaces every row with what `read` returns; entries remembered while it reads win if newer. */
  async reload(read: () => Promise<Array<[string, Entry<Row>]>>): Promise<void> {
    this.#reloading = [];
    try {
      const fresh = new Map(await read());
      for (const [key, entry] of this.#reloading) {
        const have = fresh.get(key);
        if (have === undefined || have.version < entry.version) fresh.set(key, entry);
      }
      this.#rows.clear();
      for (const index of this.#indexes.values()) index.clear();
      for (const [key, entry] of fresh) this.remember(key, entry, true);
    } finally {
      this.#reloading = undefined;
    }
  }
}
