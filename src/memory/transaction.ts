import type { Outgoing } from '../core/backbone.ts';
import { TidingsError } from '../core/errors.ts';

export type MemoryTransactionState = 'open' | 'committed' | 'rolled-back';

interface Internals {
  readonly owner: object;
  /** What this transaction is, for errors: "bus.transaction()", "handler attempt 2 of message ...". */
  readonly what: string;
  state: MemoryTransactionState;
  readonly pending: Outgoing[];
  readonly hooks: Array<() => void>;
  /** What the backbone undoes if the transaction rolls back (a schedule's claimed tick). */
  readonly undo: Array<() => void>;
}

/** Kept off the object so that a user's `tx` shows nothing to call but its small public surface. */
const internals = new WeakMap<MemoryTransaction, Internals>();

/**
 * A transaction of the memory backbone: `bus.transaction(async (tx) => ...)` and a handler's `ctx.tx`.
 * What is published through it is buffered and becomes visible, after everything committed before it,
 * only when it commits; a rollback discards it. A handler's transaction commits with the acknowledgement,
 * so what a handler publishes is delivered iff its message is acknowledged.
 */
export class MemoryTransaction {
  /** @internal Made by the memory backbone only. */
  constructor(owner: object, what: string) {
    internals.set(this, { owner, what, state: 'open', pending: [], hooks: [], undo: [] });
  }

  get state(): MemoryTransactionState {
    return internals.get(this)!.state;
  }

  /**
   * Runs `fn` right after this transaction commits (never if it rolls back): the place for a test double of
   * a write that must happen exactly once with the acknowledgement. An error thrown by `fn` is reported
   * through `onWarning` and does not undo the commit.
   */
  onCommit(fn: () => void): void {
    const inner = open(this, 'add an onCommit hook');
    inner.hooks.push(fn);
  }
}

/** The transaction's internals if it is open and belongs to `owner`; a TidingsError saying why not otherwise. */
function open(tx: MemoryTransaction, action: string, owner?: object): Internals {
  const inner = internals.get(tx);
  if (inner === undefined) {
    throw new TidingsError(
      'NO_TRANSACTION',
      `Cannot ${action}: tx is not a transaction of the memory backbone; use the tx of bus.transaction() or of the handler's ctx`,
    );
  }
  if (owner !== undefined && inner.owner !== owner) {
    throw new TidingsError('NO_TRANSACTION', `Cannot ${action}: this tx (${inner.what}) belongs to another memory backbone`);
  }
  if (inner.state !== 'open') {
    throw new TidingsError(
      'STOPPED',
      `Cannot ${action}: this tx (${inner.what}) has already ${inner.state === 'committed' ? 'committed' : 'rolled back'}; publish inside the transaction's callback or the handler, and await it`,
    );
  }
  return inner;
}

/** Runs `fn` if the open transaction `tx` rolls back. */
export function rollbackHook(tx: MemoryTransaction, fn: () => void): void {
  open(tx, 'claim a schedule tick').undo.push(fn);
}

/** Buffers messages in an open transaction of `owner`. */
export function enlist(tx: unknown, owner: object, messages: readonly Outgoing[]): void {
  if (!(tx instanceof MemoryTransaction)) {
    throw new TidingsError(
      'NO_TRANSACTION',
      `Cannot publish ${describe(messages)} in this tx: the memory backbone takes only its own transactions (bus.transaction() or the handler's ctx.tx), got ${typeof tx === 'object' && tx !== null ? (tx.constructor?.name ?? 'an object') : typeof tx}`,
    );
  }
  const inner = open(tx, `publish ${describe(messages)}`, owner);
  for (const message of messages) inner.pending.push(message);
}

/**
 * Closes the transaction: returns what it buffered and its hooks when it commits, nothing when it rolls
 * back. Once closed, it refuses further publishes (a handler that outlived its timeout, say).
 */
export function finish(tx: MemoryTransaction, commit: boolean): { messages: Outgoing[]; hooks: Array<() => void> } {
  const inner = internals.get(tx)!;
  if (inner.state !== 'open') return { messages: [], hooks: [] };
  inner.state = commit ? 'committed' : 'rolled-back';
  const result = commit ? { messages: inner.pending.splice(0), hooks: inner.hooks.splice(0) } : { messages: [], hooks: [] };
  if (!commit) for (const undo of inner.undo) undo();
  inner.pending.length = 0;
  inner.hooks.length = 0;
  inner.undo.length = 0;
  return result;
}

function describe(messages: readonly Outgoing[]): string {
  const first = messages[0]?.envelope;
  if (first === undefined) return 'nothing';
  return messages.length === 1 ? `message ${first.id} (${first.topic})` : `${messages.length} messages (the first ${first.id} on ${first.topic})`;
}
