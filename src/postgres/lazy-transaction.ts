/**
 * The `ctx.tx` of a delivery from another backbone (a broker's, through its outbox in this database: see
 * src/outbox), and how its inbox (inbox.ts) is used, priced for handlers that never write through `ctx.tx`. A broker
 * delivers one message at a time, so a transaction per delivery (BEGIN; inbox insert; handler; COMMIT)
 * costs every message a pooled connection for four round trips and its own commit flush, which starves
 * the publishers of the same pool. Instead: a cheap look-up before the handler (many deliveries' look-ups
 * share one statement), a transaction only if the handler touches `ctx.tx` (inbox record first, as before),
 * and for the others one shared insert of many handled ids, committed before any of them is acknowledged.
 * What changes: two copies of one message running at the same moment (a redelivery while the first still
 * runs; copies of one key otherwise run one after the other) may both run a handler that never uses
 * `ctx.tx`, whose effects are at least once anyway; writes through `ctx.tx` still happen once.
 * The bench's end-to-end rows on RabbitMQ and NATS with an outbox measure what this saves (PostgreSQL
 * statements and CPU per event).
 */
import { TidingsError } from '../core/errors.ts';
import type { Queryable } from './connection/driver.ts';
import type { Inbox } from './inbox.ts';
import { TrackedTransaction, type PgTransaction } from './transaction.ts';

/** The message a delivery's transaction records in its subscription's inbox, first thing. */
export interface InboxClaim {
  readonly inbox: Inbox;
  readonly subscription: string;
  readonly id: string;
}

/** Thrown inside the lazy transaction when the inbox shows another delivery of the message got there first. */
const DUPLICATE = Symbol('duplicate');
const ROLLBACK = Symbol('rollback');

/**
 * The `ctx.tx` of one delivery, opened on first use: BEGIN, then the inbox record (when the subscription
 * keeps one), so a concurrent duplicate waits on the first's row and finds it handled; then the handler's
 * statements. `end(keep)` commits or rolls back and says how it went.
 */
export class LazyTransaction {
  readonly tx: PgTransaction;
  readonly #published = new Set<string>();
  #opened: Promise<Queryable> | undefined;
  #done: Promise<void> | undefined;
  #finish: ((keep: boolean) => void) | undefined;
  #ended = false;

  constructor(
    /** The backbone's `transaction`: its commit wakes the consumers of what the handler published. */
    private readonly transaction: (fn: (tx: PgTransaction) => Promise<void>) => Promise<void>,
    private readonly inbox: InboxClaim | undefined,
  ) {
    // Tracked like the transactions the backbone drives, so what the handler publishes through it wakes the
    // relay as soon as it commits (see the end of #open).
    this.tx = new TrackedTransaction({ query: (text, params) => this.#query(text, params) }, this.#published);
  }

  async #query<R>(text: string, params?: readonly unknown[]): Promise<{ rows: R[]; rowCount?: number | null }> {
    if (this.#ended) throw new TidingsError('STOPPED', 'This handler attempt has ended (timed out or finished): its transaction can no longer be used');
    this.#opened ??= this.#open();
    const inner = await this.#opened;
    return inner.query<R>(text, params);
  }

  #open(): Promise<Queryable> {
    const finished = new Promise<boolean>((resolve) => {
      this.#finish = resolve;
    });
    return new Promise<Queryable>((resolveOpened, rejectOpened) => {
      this.#done = this.transaction(async (inner) => {
        if (this.inbox !== undefined && !(await this.inbox.inbox.claim(inner, this.inbox.id))) throw DUPLICATE;
        resolveOpened(inner);
        if (!(await finished)) throw ROLLBACK;
        if (inner instanceof TrackedTransaction) for (const topic of this.#published) inner.published.add(topic);
      });
      // If the transaction fails before it is open (pool, BEGIN, duplicate), the handler's statement fails.
      this.#done.catch((error: unknown) => {
        if (error !== DUPLICATE) return rejectOpened(error);
        const { subscription, id } = this.inbox!;
        rejectOpened(
          new TidingsError(
            'STOPPED',
            `Message ${id} was handled by another delivery to ${subscription} meanwhile: this attempt keeps none of its writes and is acknowledged`,
          ),
        );
      });
    });
  }

  /**
   * Ends the attempt: commits if `keep`, else rolls back. Resolves to 'committed', 'rolled-back',
   * 'duplicate' (another delivery recorded the message first; nothing of this one was kept) or the error
   * that kept the writes from committing.
   */
  async end(keep: boolean): Promise<'unused' | 'committed' | 'rolled-back' | 'duplicate' | { error: unknown }> {
    this.#ended = true;
    if (this.#opened === undefined) return 'unused';
    this.#finish?.(keep);
    try {
      await this.#done;
      return keep ? 'committed' : 'rolled-back';
    } catch (error) {
      if (error === DUPLICATE) return 'duplicate';
      if (error === ROLLBACK) return 'rolled-back';
      return { error };
    }
  }
}
