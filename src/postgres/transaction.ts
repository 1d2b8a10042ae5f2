import type { Outgoing } from '../core/backbone.ts';
import type { CopyIn, Prepare, Queryable, Session } from './connection/driver.ts';

/** What handlers and `bus.transaction` callbacks get as `tx`: run SQL in the transaction. */
export interface PgTransaction extends Queryable {}

/** What a `bus.transaction()` writes with its commit. */
export interface AtCommit {
  readonly messages: Outgoing[];
  /** A publish that had sent part of its messages failed: the transaction must not commit. */
  failure?: unknown;
}

/**
 * A transaction Tidings drives (a `bus.transaction()`, a handler's `ctx.tx`), as a `tx` publishes through
 * it: its session's powers (prepared statements, COPY), the topics published through it, so whoever commits
 * it wakes their consumers afterwards, and, for a `bus.transaction()`, the messages written with its commit.
 */
export class TrackedTransaction implements PgTransaction, Session {
  /** Topics published through it: their consumers are woken once it commits. */
  readonly published: Set<string>;
  /**
   * Messages published through a `bus.transaction()`, written by one statement with its commit. Absent on
   * handlers' transactions: an attempt rolled back to its savepoint must take its messages with it.
   */
  readonly atCommit: AtCommit | undefined;
  readonly prepared: Prepare | undefined;
  readonly copyIn: CopyIn | undefined;
  /** A property, not a method: `const { query } = tx` works. */
  readonly query: Queryable['query'];

  constructor(session: Session, published = new Set<string>(), atCommit?: AtCommit) {
    this.published = published;
    this.atCommit = atCommit;
    this.prepared = session.prepared;
    this.copyIn = session.copyIn;
    this.query = (text, params) => session.query(text, params);
  }
}
