/** What the partition readers of one subscription in one process share: handler slots and handled ids. */

/** `concurrency` handlers at once across the subscription's partitions; a reader that finds none waits its turn. */
export class Slots {
  #running = 0;
  readonly #waiting = new Set<() => void>();

  constructor(readonly limit: number) {}

  take(): boolean {
    if (this.#running >= this.limit) return false;
    this.#running++;
    return true;
  }

  /** `pump` is called when a slot frees up. */
  wait(pump: () => void): void {
    this.#waiting.add(pump);
  }

  give(): void {
    this.#running--;
    const waiting = [...this.#waiting];
    this.#waiting.clear();
    for (const pump of waiting) pump();
  }
}

/**
 * Ids handled lately (insertion order = age), to drop a duplicate (the same id published twice, a publish
 * retried after a lost confirm) when the subscription keeps an inbox. Per process and best effort: the
 * outbox's inbox is the durable one. A size of 0 turns it off.
 */
export class RecentIds {
  readonly #ids = new Set<string>();

  constructor(readonly size: number) {}

  has(id: string): boolean {
    return this.#ids.has(id);
  }

  add(id: string): void {
    if (this.size === 0) return;
    this.#ids.add(id);
    if (this.#ids.size > this.size) this.#ids.delete(this.#ids.values().next().value!);
  }
}
