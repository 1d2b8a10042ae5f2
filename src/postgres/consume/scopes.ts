import { TidingsError } from '../../core/errors.ts';
import type { Queryable, Session, SqlDriver, Statement } from '../connection/driver.ts';
import type { Isolation, Scope } from '../tenants.ts';
import { TrackedTransaction } from '../transaction.ts';

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
class AttemptScope implements Attempt {
  readonly tx: TrackedTransaction;
  #entered: Promise<void> | undefined;
  #release: (() => void) | undefined;
  #ended = false;

  constructor(
    private readonly batch: Queryable,
    private readonly gate: Gate,
    published: Set<string>,
    /** With tenant isolation: the scope the attempt's statements run in, set before its savepoint (tenants.ts). */
    private readonly isolated?: { readonly isolation: Isolation; readonly scope: Scope },
  ) {
    this.tx = new TrackedTransaction({ query: (text, params) => this.#query(text, params) }, published);
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
    if (this.isolated !== undefined) await this.isolated.isolation.enter(this.batch, this.isolated.scope);
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
      let lost: Error | undefined;
      if (keep) {
        try {
          await this.batch.query('release savepoint tidings_attempt');
        } catch (error) {
          await this.batch.query('rollback to savepoint tidings_attempt');
          await this.batch.query('release savepoint tidings_attempt');
          lost = error as Error;
        }
      } else {
        await this.batch.query('rollback to savepoint tidings_attempt');
        await this.batch.query('release savepoint tidings_attempt');
      }
      // The consumer's statements that follow run in its own scope again.
      if (this.isolated !== undefined) await this.isolated.isolation.enter(this.batch, 'all');
      return lost;
    } finally {
      this.#release?.();
    }
  }
}

/** One handler attempt's view of the batch transaction. */
interface Attempt {
  readonly tx: TrackedTransaction;
  /** The attempt is over: keep or drop its writes. Returns why they could not be kept, if so. */
  end(keep: boolean): Promise<Error | undefined>;
}

const ROLLBACK = Symbol('rollback');
const NOTHING_LOST: Promise<Error | undefined> = Promise.resolve(undefined);

/** A fast-mode attempt. Its `tx` is made when the handler first reads it: most handlers never do. */
class SharedAttempt implements Attempt {
  #tx: TrackedTransaction | undefined;
  ended = false;
  wrote = false;

  constructor(
    private readonly scope: SharedScope,
    private readonly published: Set<string>,
  ) {}

  get tx(): TrackedTransaction {
    return (this.#tx ??= new TrackedTransaction({ query: (text, params) => this.scope.query(this, text, params) }, this.published));
  }

  end(keep: boolean): Promise<Error | undefined> {
    this.ended = true;
    if (this.wrote && !keep) this.scope.abandoned = true;
    return NOTHING_LOST;
  }
}

/**
 * The transaction the handlers of one batch share; the acknowledgement commits in it.
 *
 * Fast mode: opened lazily by the first handler that queries `ctx.tx`, and shared without savepoints,
 * so handlers that never write cost nothing and those that do cost one round trip per statement. If an
 * attempt that wrote fails, or any statement fails, its writes cannot be undone alone: the scope is
 * abandoned, and the caller rolls back and runs the batch again in careful mode.
 *
 * Careful mode: `run` opens the transaction, and each attempt that writes gets a savepoint (AttemptScope).
 */
export class SharedScope {
  readonly #driver: SqlDriverLike;
  readonly #published: Set<string>;
  readonly #careful: boolean;
  readonly #isolation: Isolation | undefined;
  readonly #gate = new Gate();
  #opening: Promise<Session> | undefined;
  #finished: Promise<unknown> | undefined;
  #end: { resolve: () => void; reject: (reason: unknown) => void } | undefined;
  #last: Statement | undefined;
  connection: Session | undefined;
  abandoned = false;

  /** With `isolation` (tenants.ts), always careful: the transaction is the restricted role's, each attempt in its tenant's scope. */
  constructor(driver: SqlDriverLike, published: Set<string>, careful: boolean, isolation?: Isolation) {
    this.#isolation = isolation;
    this.#driver = isolation?.driver ?? driver;
    this.#published = published;
    this.#careful = careful || isolation !== undefined;
  }

  get open(): boolean {
    return this.#opening !== undefined;
  }

  /** An attempt's view of the transaction; `scope`: the tenant scope its statements run in, under isolation. */
  attempt(scope: Scope): Attempt {
    if (this.#careful) {
      const isolated = this.#isolation === undefined ? undefined : { isolation: this.#isolation, scope };
      return new AttemptScope(this.connection!, this.#gate, this.#published, isolated);
    }
    return new SharedAttempt(this, this.#published);
  }

  /** Fast mode: runs a statement of `attempt`'s handler in the shared transaction, opening it if needed. */
  async query<R>(attempt: { ended: boolean; wrote: boolean }, text: string, params?: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }> {
    if (attempt.ended) throw new TidingsError('STOPPED', 'This handler attempt has ended (timed out or finished): its transaction can no longer be used');
    if (this.abandoned) throw new TidingsError('STOPPED', 'This batch is being rolled back and will be handled again');
    attempt.wrote = true;
    const connection = await this.#begin();
    // A pipelining connection takes the handlers' statements as they come, each sent without waiting
    // for the others' answers; any other, one at a time (pg stops queueing them for us).
    const release = connection.pipelined === true ? undefined : await this.#gate.acquire();
    try {
      return await connection.query<R>(text, params);
    } catch (error) {
      this.abandoned = true;
      throw error;
    } finally {
      release?.();
    }
  }

  /** Careful mode: runs `fn` in a transaction opened now; it commits if `fn` resolves. */
  async run(fn: () => Promise<void>): Promise<void> {
    await this.#driver.transaction(async (tx) => {
      this.connection = tx;
      await fn();
    });
  }

  /** Commits, with `last` (the acknowledgement) sent in the same round trip as COMMIT. */
  async commit(last?: Statement): Promise<void> {
    this.#last = last;
    this.#end?.resolve();
    await this.#finished;
  }

  async rollback(): Promise<void> {
    this.#end?.reject(ROLLBACK);
    await this.#finished?.catch((error: unknown) => {
      if (error !== ROLLBACK) throw error;
    });
  }

  /** Opens the fast-mode transaction once, and holds it open until commit or rollback. */
  #begin(): Promise<Session> {
    this.#opening ??= new Promise<Session>((resolve, reject) => {
      const ended = new Promise<void>((resolveEnd, rejectEnd) => {
        this.#end = { resolve: resolveEnd, reject: rejectEnd };
      });
      // If the transaction never opened (the database is unreachable), nobody awaits `ended`.
      ended.catch(() => undefined);
      this.#finished = this.#driver.transaction(
        async (tx) => {
          this.connection = tx;
          resolve(tx);
          await ended;
        },
        () => this.#last,
      );
      this.#finished.catch(reject);
    });
    return this.#opening;
  }
}

/** The part of SqlDriver a scope needs. */
type SqlDriverLike = Pick<SqlDriver, 'transaction'>;
