import type { Outgoing } from '../core/backbone.ts';
import { COPY_IN, PREPARED, type CopyIn, type Prepare, type Queryable } from './driver.ts';

/** What handlers and `bus.transaction` callbacks get as `tx`: run SQL in the transaction. */
export interface PgTransaction extends Queryable {}

/** Topics published through a transaction Tidings drives, to wake their consumers once it commits. */
export const PUBLISHED = Symbol('tidings.published');
/**
 * Messages published through a `bus.transaction()`, written by one statement with its commit. Absent on
 * handlers' transactions: an attempt rolled back to its savepoint must take its messages with it.
 */
export const AT_COMMIT = Symbol('tidings.atCommit');

/** What a `bus.transaction()` writes with its commit. */
export interface AtCommit {
  readonly messages: Outgoing[];
  /** A publish that had sent part of its messages failed: the transaction must not commit. */
  failure?: unknown;
}

export interface TrackedTransaction extends PgTransaction {
  readonly [PUBLISHED]: Set<string>;
  readonly [AT_COMMIT]?: AtCommit;
}

export function track(inner: Queryable, published = new Set<string>(), atCommit?: AtCommit): TrackedTransaction {
  const prepare = (inner as { [PREPARED]?: Prepare })[PREPARED];
  const copyIn = (inner as { [COPY_IN]?: CopyIn })[COPY_IN];
  return {
    [PUBLISHED]: published,
    ...(atCommit === undefined ? {} : { [AT_COMMIT]: atCommit }),
    query: (text, params) => inner.query(text, params),
    ...(prepare === undefined ? {} : { [PREPARED]: prepare }),
    ...(copyIn === undefined ? {} : { [COPY_IN]: copyIn }),
  };
}

export function isTracked(tx: unknown): tx is TrackedTransaction {
  return typeof tx === 'object' && tx !== null && PUBLISHED in tx;
}
