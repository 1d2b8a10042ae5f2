import { TidingsError } from '../../core/errors.ts';
import type { Session, SqlDriver, Statement } from '../connection/driver.ts';
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
 * and runs in parallel with the others. On first use it takes the batch's gate and opens a savepoint (under
 * isolation, after setting its tenant's scope), so a failed attempt rolls back only its own writes; the gate
 * is held until the attempt ends. Its own statements are sent ahead of the handler's first statement where
 * the connection pipelines: no round trip of their own, and if one fails, every statement after it fails
 * too. Its savepoint's release waits to travel with the next attempt's savepoint (COMMIT releases the last).
 *
 * Under isolation, an attempt whose tenant's scope is still the one in force (the attempt before it was its
 * tenant's, and no consumer statement came between) enters no new one (SharedScope.inForce).
 */
class AttemptScope implements Attempt {
  readonly tx: TrackedTransaction;
  #entered: Promise<Session> | undefined;
  #release: (() => void) | undefined;
  #ended = false;
  /** What this attempt sent: its own statements (scope, savepoint) first, then the handler's. */
  readonly #sent: Array<Promise<unknown>> = [];
  /** How many of `#sent` are the attempt's own. */
  #own = 0;

  constructor(
    private readonly shared: SharedScope,
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
    if (this.shared.abandoned) throw new TidingsError('STOPPED', 'This batch is being rolled back and will be handled again');
    this.#entered ??= this.#enter();
    const session = await this.#entered;
    return this.#send(session.query<R>(text, params));
  }

  async #enter(): Promise<Session> {
    this.#release = await this.gate.acquire();
    const session = await this.shared.session();
    // Where the session pipelines, these travel with the handler's statement; elsewhere each is answered first.
    const ahead = async (sent: Promise<unknown>) => {
      this.#send(sent);
      if (session.pipelined === true) sent.catch(() => undefined);
      else await sent;
    };
    if (this.isolated !== undefined && !this.shared.inForce(this.isolated.scope)) {
      // The scope before the savepoint: a ROLLBACK TO it lands in the tenant's scope. (A scope set inside the
      // last attempt's savepoint outlives its release.)
      await ahead(this.isolated.isolation.enter(session, this.isolated.scope));
    }
    await ahead(this.shared.savepoint(session));
    this.#own = this.#sent.length;
    return session;
  }

  #send<T>(sent: Promise<T>): Promise<T> {
    this.#sent.push(sent);
    return sent;
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
      const session = await this.#entered;
      const outcomes = await Promise.allSettled(this.#sent);
      const failed = outcomes.findIndex((outcome) => outcome.status === 'rejected');
      // The scope or the savepoint itself failed: the transaction is unusable, the batch fails with why.
      if (failed !== -1 && failed < this.#own) throw (outcomes[failed] as PromiseRejectedResult).reason;
      if (keep && failed === -1) {
        // No statement failed, so neither can the release: it travels with the next attempt's savepoint.
        this.shared.deferRelease();
        return undefined;
      }
      let lost: Error | undefined;
      if (keep) {
        // A statement failed: the handler may have undone it (a savepoint of its own), or not.
        try {
          await session.query('release savepoint tidings_attempt');
          return undefined;
        } catch (error) {
          lost = error as Error;
        }
      }
      await session.query('rollback to savepoint tidings_attempt');
      await session.query('release savepoint tidings_attempt');
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
/**
 * Handler SQL that may roll back to a savepoint (see SharedScope.query). Only the keyword can: PL/pgSQL and
 * SQL functions cannot, and a keyword cannot be built from parts; a false match (a literal) costs a wait.
 */
const ROLLS_BACK = /rollback/i;
const NOTHING_LOST: Promise<Error | undefined> = Promise.resolve(undefined);

/** A fast-mode attempt. Its `tx` is made when the handler first reads it: most handlers never do. */
class SharedAttempt implements Attempt {
  #tx: TrackedTransaction | undefined;
  ended = false;
  wrote = false;

  constructor(
    private readonly scope: SharedScope,
    private readonly published: Set<string>,
    /** Under isolation: the tenant scope each of its statements runs in (entered before it, see SharedScope.query). */
    readonly tenantScope?: Scope,
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
 * The transaction the handlers of one batch share; the acknowledgement commits in it. It is opened by the
 * first handler that queries `ctx.tx` (or by `run`): if none does, the acknowledgement commits alone.
 *
 * Fast mode: shared without savepoints, so handlers that write cost one round trip per statement. If an
 * attempt that wrote fails, or any statement fails, its writes cannot be undone alone: the scope is
 * abandoned, and the caller rolls back and runs the batch again in careful mode.
 *
 * Careful mode: each attempt that writes gets a savepoint (AttemptScope).
 *
 * Under tenant isolation the transaction is the restricted role's (tenants.ts), and the consumer's statements
 * (`connection`, and the one sent with COMMIT) run in scope `all`, set again before the first of them that
 * follows a handler's. In fast mode each handler statement runs in its tenant's scope, entered just before
 * it whenever another scope is in force (SharedScope.query); in careful mode each attempt's, before its
 * savepoint (AttemptScope).
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
  /** The transaction's session, as attempts use it. */
  #session: Session | undefined;
  /** Under isolation: the scope entered last in the transaction (`all` for the consumer's statements). */
  #inForce: Scope | undefined;
  /** Commit or rollback has begun: a handler statement still on its way (not awaited by its handler) is refused. */
  #ending = false;
  /** Under isolation, fast mode: rejects once a statement sent so far (a scope's entry or a handler's) has failed. */
  #healthy: Promise<void> = Promise.resolve();
  /** A statement sent without waiting for its answer failed: the transaction is aborted, and this is why. */
  #failed: unknown;
  /** The last attempt's savepoint, kept: released with the next attempt's savepoint (COMMIT releases it anyway). */
  #releasing = false;
  /** The transaction as the consumer's own statements use it (in scope `all` under isolation). */
  connection: Session | undefined;
  abandoned = false;

  /** With `isolation` (tenants.ts): the transaction is the restricted role's, each handler statement in its tenant's scope. */
  constructor(driver: SqlDriverLike, published: Set<string>, careful: boolean, isolation?: Isolation) {
    this.#isolation = isolation;
    this.#driver = isolation?.driver ?? driver;
    this.#published = published;
    this.#careful = careful;
  }

  get open(): boolean {
    return this.#opening !== undefined;
  }

  /** An attempt's view of the transaction; `scope`: the tenant scope its statements run in, under isolation. */
  attempt(scope: Scope): Attempt {
    if (this.#careful) {
      const isolated = this.#isolation === undefined ? undefined : { isolation: this.#isolation, scope };
      return new AttemptScope(this, this.#gate, this.#published, isolated);
    }
    return new SharedAttempt(this, this.#published, this.#isolation === undefined ? undefined : scope);
  }

  /** Careful mode: the transaction's session, opened now if it is not yet. */
  session(): Promise<Session> {
    return this.#session === undefined ? this.#begin() : Promise.resolve(this.#session);
  }

  /**
   * Whether `scope` is the one in force; if not, the caller enters it now. Consecutive attempts (in fast mode,
   * statements) of one tenant share its scope: handler SQL of that tenant can spoil it (a `set_config` of the
   * proof) only for its own tenant's next ones, which then see nothing; another tenant's scope is always
   * entered anew.
   */
  inForce(scope: Scope): boolean {
    if (this.#inForce === scope) return true;
    this.#inForce = scope;
    return false;
  }

  /** The attempt that ended kept its writes: its savepoint is released with the next attempt's. */
  deferRelease(): void {
    this.#releasing = true;
  }

  /**
   * Opens an attempt's savepoint, releasing the last attempt's first if it is still open: one simple query on
   * a server connection; two on embedded PostgreSQL, whose queries take one statement each.
   */
  savepoint(session: Session): Promise<unknown> {
    const releasing = this.#releasing;
    this.#releasing = false;
    if (!releasing) return session.query('savepoint tidings_attempt');
    if (session.pipelined === true) return session.query('release savepoint tidings_attempt; savepoint tidings_attempt');
    return session.query('release savepoint tidings_attempt').then(() => session.query('savepoint tidings_attempt'));
  }

  /**
   * Fast mode: runs a statement of `attempt`'s handler in the shared transaction, opening it if needed.
   *
   * Under isolation, its tenant's scope is entered right before it unless it is the one in force, the two
   * sent back to back: a statement runs only after its own tenant's entry, or after another statement of
   * that tenant with nothing between. A `rollback to savepoint` in handler SQL can bring back only a proof
   * bound to an older entry, worth nothing (the entry counter is a sequence no rollback undoes); a failed
   * statement, the entry's included, abandons the batch, so handler SQL recovering from a failure with its
   * own savepoint runs only in careful mode, where attempts take turns. test/tenancy.pg.test.ts attacks it.
   *
   * In a transaction aborted by a failed statement whose answer is not back yet, a scope's entry fails
   * without advancing the counter, so a `rollback to savepoint` sent then would revive the transaction with
   * the scope of the savepoint's tenant, still proven. So a statement that may roll back (its text says
   * `rollback`) is sent only once every statement before it has succeeded, its own scope's entry among them,
   * and none is in flight; and an answer is handed back only if every statement sent before it succeeded
   * (`#behind`).
   */
  async query<R>(attempt: SharedAttempt, text: string, params?: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }> {
    if (attempt.ended) throw new TidingsError('STOPPED', 'This handler attempt has ended (timed out or finished): its transaction can no longer be used');
    if (attempt.tenantScope !== undefined && typeof text !== 'string') {
      // pg would run a query config object's text unread, past the `rollback` check below.
      throw new TypeError(
        `ctx.tx.query: the statement must be a string under tenancy isolation, not ${typeof text}; pass its text and params as two arguments`,
      );
    }
    this.#refuseIfEnding();
    attempt.wrote = true;
    const connection = await this.#begin();
    // A pipelining connection takes the handlers' statements as they come, each sent without waiting
    // for the others' answers; any other, one at a time (pg stops queueing them for us).
    const release = connection.pipelined === true ? undefined : await this.#gate.acquire();
    try {
      const scope = attempt.tenantScope;
      if (scope === undefined) {
        this.#refuseIfEnding();
        return await connection.query<R>(text, params);
      }
      if (ROLLS_BACK.test(text)) {
        // Checked and sent in one go, so nothing can be queued between: the transaction is healthy, nothing
        // is in flight, and the scope in force is its own, entered before and answered.
        for (let healthy = this.#healthy; ; healthy = this.#healthy) {
          await healthy.catch(() => {
            throw behindFailure();
          });
          if (healthy !== this.#healthy) continue;
          this.#refuseIfEnding();
          if (this.inForce(scope)) break;
          this.#behind(this.#isolation!.enter(connection, scope)).catch(() => undefined);
        }
        return await this.#behind(connection.query<R>(text, params));
      }
      this.#refuseIfEnding();
      const entering = this.inForce(scope) ? undefined : this.#behind(this.#isolation!.enter(connection, scope));
      if (connection.pipelined !== true) {
        await entering;
        return await this.#behind(connection.query<R>(text, params));
      }
      // Queued right behind its scope, before anything else can be: no await between the two. If the entry
      // fails, so does the statement (#behind).
      entering?.catch(() => undefined);
      return await this.#behind(connection.query<R>(text, params));
    } catch (error) {
      this.abandoned = true;
      throw error;
    } finally {
      release?.();
    }
  }

  /**
   * `sent`'s answer, handed back only if every statement sent before it succeeded; else a failure that names
   * none of them (another tenant's error may quote its data). Answers come in the order statements were
   * sent, so this waits for nothing more.
   */
  #behind<T>(sent: Promise<T>): Promise<T> {
    const answer = this.#healthy.then(
      () => sent,
      () => {
        throw behindFailure();
      },
    );
    sent.catch(() => undefined);
    this.#healthy = answer.then(() => undefined);
    this.#healthy.catch(() => {
      this.abandoned = true;
    });
    return answer;
  }

  /** A statement that would be sent now could not be kept: the batch is being rolled back, or is ending. */
  #refuseIfEnding(): void {
    if (this.abandoned) throw new TidingsError('STOPPED', 'This batch is being rolled back and will be handled again');
    if (this.#ending) throw new TidingsError('STOPPED', "This batch's transaction is ending: a statement sent after its handlers finished cannot join it");
  }

  /** Careful mode: runs `fn` in a transaction opened now, for a caller with statements of its own around the handlers'; it commits if `fn` resolves. */
  async run(fn: () => Promise<void>): Promise<void> {
    try {
      await this.#driver.transaction(async (tx) => {
        this.#opened(tx);
        await fn();
      });
    } catch (error) {
      throw this.#failed ?? error;
    }
  }

  /** Commits, with `last` (the acknowledgement) sent in the same round trip as COMMIT. */
  async commit(last?: Statement): Promise<void> {
    this.#ending = true;
    // Still opening if its only statement so far was one a handler sent without waiting for it.
    const session = this.#session ?? (await this.#opening);
    if (last !== undefined && session !== undefined) await this.#enterConsumerScope(session);
    this.#last = last;
    this.#end?.resolve();
    try {
      await this.#finished;
    } catch (error) {
      throw this.#failed ?? error;
    }
  }

  async rollback(): Promise<void> {
    this.#ending = true;
    this.#end?.reject(ROLLBACK);
    await this.#finished?.catch((error: unknown) => {
      if (error !== ROLLBACK) throw error;
    });
  }

  /** Opens the transaction once, and holds it open until commit or rollback. */
  #begin(): Promise<Session> {
    this.#opening ??= new Promise<Session>((resolve, reject) => {
      const ended = new Promise<void>((resolveEnd, rejectEnd) => {
        this.#end = { resolve: resolveEnd, reject: rejectEnd };
      });
      // If the transaction never opened (the database is unreachable), nobody awaits `ended`.
      ended.catch(() => undefined);
      this.#finished = this.#driver.transaction(
        async (tx) => {
          this.#opened(tx);
          resolve(tx);
          await ended;
        },
        () => this.#last,
      );
      this.#finished.catch(reject);
    });
    return this.#opening;
  }

  #opened(tx: Session): void {
    this.#session = tx;
    if (this.#isolation === undefined) {
      this.connection = tx;
      return;
    }
    const inScope = <T>(run: () => Promise<T>): Promise<T> => {
      const entering = this.#enterConsumerScope(tx);
      return entering === undefined ? run() : entering.then(run);
    };
    const { prepared } = tx;
    this.connection = {
      query: (text, params) => inScope(() => tx.query(text, params)),
      prepared: prepared === undefined ? undefined : (name, text, params) => inScope(() => prepared(name, text, params)),
      pipelined: tx.pipelined,
    };
  }

  /**
   * Under isolation, sets scope `all` for the consumer's statement about to be sent, unless it is in force.
   * Where the session pipelines it travels with that statement (undefined: nothing to wait for).
   */
  #enterConsumerScope(tx: Session): Promise<void> | undefined {
    if (this.#isolation === undefined || this.#inForce === 'all') return undefined;
    this.#inForce = 'all';
    const entering = this.#isolation.enter(tx, 'all').then(() => undefined);
    if (tx.pipelined !== true) return entering;
    // If it fails, the transaction is aborted: the consumer's statement after it fails too, with a vaguer error.
    entering.catch((error: unknown) => {
      this.#failed ??= error;
    });
    return undefined;
  }
}

/** A statement before this one failed; which, and why, is not this statement's handler's to read (another tenant's error may quote its data). */
function behindFailure(): TidingsError {
  return new TidingsError('STOPPED', "A statement sent before this one in the batch's transaction failed: the batch will be handled again");
}

/** The part of SqlDriver a scope needs. */
type SqlDriverLike = Pick<SqlDriver, 'transaction'>;
