import { runStatement, type SqlDriver, type Statement } from '../connection/driver.ts';
import { ackAlone } from './acknowledgement.ts';

/** An acknowledgement as `ackStatement` makes it: 'fail' commits alone, 'skip' after an inbox id was found recorded. */
export type AckStatement = (duplicates: 'skip' | 'fail') => Statement;

/**
 * Most acknowledgements in one combined transaction: each is a statement in it, sent in one write, and a
 * transaction whose statements all wait on one lock or one failure should stay small.
 */
const MAX_GROUP = 64;

interface Waiting {
  readonly ack: AckStatement;
  /** The subscription's acknowledgement before this one, queued too: this one commits only after it, and fails if it does. */
  readonly after: Settling | undefined;
  /** What `commit` returned for it. */
  readonly promise: Promise<void>;
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

/** A promise whose outcome can be read once known. */
interface Settling {
  readonly promise: Promise<void>;
  outcome: 'pending' | 'committed' | 'failed';
  error?: unknown;
}

function settling(promise: Promise<void>): Settling {
  const state: Settling = { promise, outcome: 'pending' };
  promise.then(
    () => {
      state.outcome = 'committed';
    },
    (error: unknown) => {
      state.outcome = 'failed';
      state.error = error;
    },
  );
  return state;
}

/** Why an acknowledgement queued behind another was not sent: that one failed, and its batch and this one are read again. */
export class AckBehindFailed extends Error {
  constructor(cause: unknown) {
    super(`an earlier acknowledgement failed: ${(cause as Error)?.message ?? String(cause)}`, { cause });
  }
}

/**
 * The acknowledgements that commit alone (no handler wrote through `ctx.tx`), of every subscription this
 * process consumes on one backbone, committed together: one goes at once, and those sent while it commits
 * wait for it and then commit in one transaction, with one COMMIT and one WAL flush, where each would have
 * cost its own (group commit, as the publisher's). With 16 subscriptions each acknowledging every event,
 * most of the server's commits (and fsyncs) were these acknowledgements (issue 24, fan-out).
 *
 * Nothing is traded: each acknowledgement keeps its own fence and is durable when its promise resolves. A
 * combined transaction commits only if every acknowledgement in it passes its fence: one that fails (a
 * lease lost, the subscription's topics changed, an inbox id recorded meanwhile) rolls the transaction
 * back, and then each is sent again alone (`ackAlone`), so only the one whose fence failed fails; the
 * others commit as if they had gone alone. A combined COMMIT whose outcome is unknown (the connection
 * died) is also sent again alone: a committed acknowledgement sent again sets its cursors to the same
 * place and finds its inbox ids recorded (its `handled` counters count the batch twice, as a batch read
 * again after such a failure does). A subscription sends its next acknowledgement only once its last one
 * has committed (batch.ts), so a subscription's acknowledgements still commit in order.
 * test/ackgroup.pg.test.ts.
 */
export class AckGroup {
  readonly #driver: SqlDriver;
  #waiting: Waiting[] = [];
  #flushing = false;
  /** Each chain's last acknowledgement (see `commit`). */
  readonly #last = new Map<object, Settling>();

  constructor(driver: SqlDriver) {
    this.#driver = driver;
  }

  /**
   * Commits `ack`, with the others waiting at the time; resolves once it has committed, rejects as `ackAlone`
   * would. `chain`: the subscription's worker, whose acknowledgements may be queued while the one before is
   * still committing: each commits after the one before it, in the same transaction or a later one, and is
   * never sent if that one failed (AckBehindFailed), so its cursors never move past a batch whose
   * acknowledgement failed.
   */
  commit(ack: AckStatement, chain?: object): Promise<void> {
    const before = chain === undefined ? undefined : this.#last.get(chain);
    const after = before?.outcome === 'committed' ? undefined : before;
    let resolve!: () => void;
    let reject!: (error: unknown) => void;
    const promise = new Promise<void>((resolveIt, rejectIt) => {
      resolve = resolveIt;
      reject = rejectIt;
    });
    if (chain !== undefined) {
      const state = settling(promise);
      this.#last.set(chain, state);
      // Forget a chain once its last acknowledgement has settled: a stopped worker leaves nothing behind.
      const forget = () => {
        if (this.#last.get(chain) === state) this.#last.delete(chain);
      };
      promise.then(forget, forget);
    }
    if (this.#driver.embedded) {
      // One session (PGlite): a combined transaction would hold it from the handlers' transactions; nothing to gain.
      (after?.promise ?? Promise.resolve()).then(() => ackAlone(this.#driver, ack), behind).then(resolve, reject);
    } else {
      this.#waiting.push({ ack, after, promise, resolve, reject });
      if (!this.#flushing) void this.#flush();
    }
    return promise;
  }

  async #flush(): Promise<void> {
    this.#flushing = true;
    try {
      while (this.#waiting.length > 0) {
        // An acknowledgement behind one still pending (committing elsewhere) waits for it: let it settle.
        if (this.#waiting[0]!.after?.outcome === 'pending') await this.#waiting[0]!.after.promise.catch(() => undefined);
        await this.#commitGroup(this.#takeGroup());
      }
    } finally {
      this.#flushing = false;
    }
  }

  /**
   * The next group, in the order acknowledgements came: up to MAX_GROUP, stopping before one whose previous
   * acknowledgement is outside the group and not yet committed. Those whose previous one failed are refused here.
   */
  #takeGroup(): Waiting[] {
    const group: Waiting[] = [];
    const inGroup = new Set<Promise<void>>();
    while (this.#waiting.length > 0 && group.length < MAX_GROUP) {
      const waiting = this.#waiting[0]!;
      const after = waiting.after;
      if (after !== undefined && after.outcome === 'failed') {
        this.#waiting.shift();
        waiting.reject(new AckBehindFailed(after.error));
        continue;
      }
      if (after !== undefined && after.outcome === 'pending' && !inGroup.has(after.promise)) break;
      this.#waiting.shift();
      group.push(waiting);
      inGroup.add(waiting.promise);
    }
    return group;
  }

  async #commitGroup(group: Waiting[]): Promise<void> {
    if (group.length === 0) return;
    if (group.length > 1) {
      try {
        await this.#together(group);
        for (const waiting of group) waiting.resolve();
        return;
      } catch {
        // Rolled back (or its outcome unknown): each goes again alone, and fails alone, below; one behind
        // another of its subscription in the group goes once that one has committed, and not if it failed.
      }
    }
    await Promise.all(
      group.map((waiting) =>
        (waiting.after?.promise ?? Promise.resolve()).then(() => ackAlone(this.#driver, waiting.ack), behind).then(waiting.resolve, waiting.reject),
      ),
    );
  }

  /** All of `group` in one transaction: the statements sent without waiting for each other, the last with COMMIT. */
  async #together(group: readonly Waiting[]): Promise<void> {
    const last = group[group.length - 1]!;
    await this.#driver.transaction(
      async (tx) => {
        const sent = group.slice(0, -1).map((waiting) => runStatement(tx, waiting.ack('fail')));
        for (const statement of sent) statement.catch(() => undefined);
        // Pipelined, the COMMIT goes right behind them: one that fails aborts the transaction, and the COMMIT
        // reports the rollback. A pool that does not pipeline sends them one by one: they must be answered first.
        if (!tx.pipelined) await Promise.all(sent);
      },
      () => last.ack('fail'),
    );
  }
}

function behind(error: unknown): never {
  throw error instanceof AckBehindFailed ? error : new AckBehindFailed(error);
}
