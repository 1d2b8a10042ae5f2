/**
 * The memory backbone (backbone.ts): Tidings in one process, with no server. The folder: options.ts,
 * backbone.ts, publisher.ts (the log, routing to subscriptions, scheduled messages), consume/ (a subscription's
 * lanes and keys, its workers), dead-letters.ts, transaction.ts, drain.ts, replies.ts, sagas.ts. It has no
 * codec (messages stay objects; each delivery parses its own copy of the data) and no connection.
 */
import { MemoryBackbone } from './backbone.ts';
import type { MemoryOptions } from './options.ts';

export { MemoryBackbone } from './backbone.ts';
export { memoryDefaults, type DrainOptions, type MemoryOptions } from './options.ts';
export { MemoryTransaction, type MemoryTransactionState } from './transaction.ts';

/** The in-memory backbone: `createBus({ service, backbone: memory() })`, then `await backbone.drain()` in tests. */
export function memory(options?: MemoryOptions): MemoryBackbone {
  return new MemoryBackbone(options);
}
