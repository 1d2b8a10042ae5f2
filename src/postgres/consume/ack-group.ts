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
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
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

  constructor(driver: SqlDriver) {
    this.#driver = driver;
  }

  /** Commits `ack`, with the others waiting at the time; resolves once it has committed, rejects as `ackAlone` would. */
  commit(ack: AckStatement): Promise<void> {
    // One session (PGlite): a combined transaction would hold it from the handlers' transactions; nothing to gain.
    if (this.#driver.embedded) return ackAlone(this.#driver, ack);
    return new Promise((resolve, reject) => {
      this.#waiting.push({ ack, resolve, reject });
      if (!this.#flushing) void this.#flush();
    });
  }

  async #flush(): Promise<void> {
    this.#flushing = true;
    try {
      while (this.#waiting.length > 0) await this.#commitGroup(this.#waiting.splice(0, MAX_GROUP));
    } finally {
      this.#flushing = false;
    }
  }

  async #commitGroup(group: Waiting[]): Promise<void> {
    if (group.length > 1) {
      try {
        await this.#together(group);
        for (const waiting of group) waiting.resolve();
        return;
      } catch {
        // Rolled back (or its outcome unknown): each goes again alone, and fails alone, below.
      }
    }
    await Promise.all(group.map((waiting) => ackAlone(this.#driver, waiting.ack).then(waiting.resolve, waiting.reject)));
  }

  /** All of `group` in one transaction: the statements sent without waiting for each other, the last with COMMIT. */
  async #together(group: Waiting[]): Promise<void> {
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
