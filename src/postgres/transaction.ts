import { TidingsError } from '../core/errors.ts';
import type { Queryable } from './driver.ts';

/** What handlers and `bus.transaction` callbacks get as `tx`: run SQL in the transaction. */
export interface PgTransaction extends Queryable {}

/** Topics published through a transaction Tidings drives, to wake their consumers once it commits. */
export const PUBLISHED = Symbol('tidings.published');

export interface TrackedTransaction extends PgTransaction {
  readonly [PUBLISHED]: Set<string>;
}

export function track(inner: Queryable, published = new Set<string>()): TrackedTransaction {
  return {
    [PUBLISHED]: published,
    query: (text, params) => inner.query(text, params),
  };
}

export function isTracked(tx: unknown): tx is TrackedTransaction {
  return typeof tx === 'object' && tx !== null && PUBLISHED in tx;
}

/** A mutex: handlers of one batch share one connection, and a savepoint must not interleave with another. */
export class Gate {
  #tail: Promise<void> = Promise.resolve();

  acquire(): Promise<() => void> {
    let release!: () => void;
    const next = new Promise<void>((resolve) => {
      release = resolve;
    });
    const ready = this.#tail.then(() => release);
    this.#tail = this.#tail.then(() => next);
    return ready;
  }
}

/**
 * The transaction one handler attempt sees. It is lazy: a handler that never touches `ctx.tx` costs nothing
 * and runs in parallel with the others. On first use it takes the batch's gate and opens a savepoint, so a
 * failed attempt rolls back only its own writes; the gate is held until the attempt ends.
 */
export class AttemptScope {
  readonly tx: TrackedTransaction;
  #entered: Promise<void> | undefined;
  #release: (() => void) | undefined;
  #ended = false;

  constructor(
    private readonly batch: Queryable,
    private readonly gate: Gate,
    published: Set<string>,
  ) {
    this.tx = track({ query: (text, params) => this.#query(text, params) }, published);
  }

  async #query<R>(text: string, params?: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }> {
    if (this.#ended) {
      throw new TidingsError('STOPPED', 'This handler attempt has ended (timed out or finished): its transaction can no longer be used');
    }
    this.#entered ??= this.#enter();
    await this.#entered;
    return this.batch.query<R>(text, params);
  }

  async #enter(): Promise<void> {
    this.#release = await this.gate.acquire();
    await this.batch.query('savepoint tidings_attempt');
  }

  /**
   * Keeps the attempt's writes (success) or rolls them back, and frees the gate. Returns the error if the
   * writes could not be kept: a statement failed inside the savepoint and the handler caught it, so its
   * transaction is aborted even though the handler returned normally.
   */
  async end(keep: boolean): Promise<Error | undefined> {
    this.#ended = true;
    if (this.#entered === undefined) return undefined;
    try {
      await this.#entered;
      if (keep) {
        try {
          await this.batch.query('release savepoint tidings_attempt');
          return undefined;
        } catch (error) {
          await this.batch.query('rollback to savepoint tidings_attempt');
          await this.batch.query('release savepoint tidings_attempt');
          return error as Error;
        }
      }
      await this.batch.query('rollback to savepoint tidings_attempt');
      await this.batch.query('release savepoint tidings_attempt');
      return undefined;
    } finally {
      this.#release?.();
    }
  }
}
