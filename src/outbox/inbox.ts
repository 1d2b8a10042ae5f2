/**
 * The inbox of a brokered subscription, priced for handlers that never write through `ctx.tx`. A broker
 * delivers one message at a time, so a transaction per delivery (BEGIN; inbox insert; handler; COMMIT)
 * costs every message a pooled connection for four round trips and its own commit flush, which starves
 * the publishers of the same pool. Instead: a cheap look-up before the handler (many deliveries' look-ups
 * share one statement), a transaction only if the handler touches `ctx.tx` (inbox record first, as before),
 * and for the others one shared insert of many handled ids, committed before any of them is acknowledged.
 * What changes: two copies of one message running at the same moment (a redelivery while the first still
 * runs; copies of one key otherwise run one after the other) may both run a handler that never uses
 * `ctx.tx`, whose effects are at least once anyway; writes through `ctx.tx` still happen once.
 *
 * Measured on the outbox end-to-end row (NATS, 3,000 events): PostgreSQL statements per event 6.6 -> 4.2
 * (of them the producer's BEGIN, INSERT, COMMIT), the process's CPU per event -15 %.
 */
import type { SqlDriver, Queryable } from '../postgres/driver.ts';
import type { PgTransaction, PostgresBackbone } from '../postgres/index.ts';
import { TrackedTransaction } from '../postgres/transaction.ts';
import { TidingsError } from '../core/errors.ts';

/**
 * Runs the requests that arrive while earlier ones are being run together, in one call: group commit. At
 * most `inFlight` calls run at once, so a lone request pays one round trip and a crowd shares a few.
 */
export class Coalescer<In, Out> {
  #waiting: Array<{ item: In; resolve: (out: Out) => void; reject: (error: unknown) => void }> = [];
  #running = 0;

  constructor(
    private readonly run: (items: In[]) => Promise<Out[]>,
    private readonly inFlight: number,
  ) {}

  submit(item: In): Promise<Out> {
    return new Promise<Out>((resolve, reject) => {
      this.#waiting.push({ item, resolve, reject });
      if (this.#running < this.inFlight) void this.#drain();
    });
  }

  async #drain(): Promise<void> {
    this.#running++;
    while (this.#waiting.length > 0) {
      const batch = this.#waiting.splice(0, this.#waiting.length);
      try {
        const outs = await this.run(batch.map((request) => request.item));
        batch.forEach((request, i) => request.resolve(outs[i]!));
      } catch (error) {
        for (const request of batch) request.reject(error);
      }
    }
    this.#running--;
  }
}

/** Look-ups and records of handled message ids for one subscription, each shared by concurrent deliveries. */
export class SharedInbox {
  readonly #seen: Coalescer<string, boolean>;
  readonly #record: Coalescer<string, undefined>;

  constructor(driver: SqlDriver, schema: string, subscription: string) {
    // One statement in flight per kind: the next batch fills while it runs. Measured on the outbox e2e
    // row: 0.69 inbox statements per message against 1.02 with two in flight, and the pool keeps its
    // connections for publishers and for handlers that do open a transaction.
    this.#seen = new Coalescer(async (ids) => {
      const { rows } = await driver.query<{ message_id: string }>(
        `select message_id from ${schema}.inbox where subscription = $1 and message_id = any($2::text[])`,
        [subscription, ids],
      );
      const found = new Set(rows.map((row) => row.message_id));
      return ids.map((id) => found.has(id));
    }, 1);
    this.#record = new Coalescer(async (ids) => {
      await driver.query(`insert into ${schema}.inbox (subscription, message_id) select $1, unnest($2::text[]) on conflict do nothing`, [subscription, ids]);
      return ids.map(() => undefined);
    }, 1);
  }

  /** True if a delivery of this id was handled (and recorded) before. */
  seen(id: string): Promise<boolean> {
    return this.#seen.submit(id);
  }

  /** Records a handled id; resolves once committed, so the broker may then be acknowledged. */
  async record(id: string): Promise<void> {
    await this.#record.submit(id);
  }
}

/** Thrown inside the lazy transaction when the inbox shows another delivery of the message got there first. */
export const DUPLICATE = Symbol('duplicate');
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
    private readonly outbox: PostgresBackbone,
    private readonly inbox: { subscription: string; id: string } | undefined,
  ) {
    // Tracked like the transactions the outbox drives, so what the handler publishes through it wakes the
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
      this.#done = this.outbox.transaction(async (inner) => {
        if (this.inbox !== undefined) {
          const { rows } = await inner.query(
            `insert into ${this.outbox.schema}.inbox (subscription, message_id) values ($1, $2) on conflict do nothing returning 1 as fresh`,
            [this.inbox.subscription, this.inbox.id],
          );
          if (rows.length === 0) throw DUPLICATE;
        }
        resolveOpened(inner);
        if (!(await finished)) throw ROLLBACK;
        if (inner instanceof TrackedTransaction) for (const topic of this.#published) inner.published.add(topic);
      });
      // If the transaction fails before it is open (pool, BEGIN, duplicate), the handler's statement fails.
      this.#done.catch((error: unknown) => {
        if (error !== DUPLICATE) return rejectOpened(error);
        const { subscription, id } = this.inbox!;
        rejectOpened(new TidingsError('STOPPED', `Message ${id} was handled by another delivery to ${subscription} meanwhile: this attempt keeps none of its writes and is acknowledged`));
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
