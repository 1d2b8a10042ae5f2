/** What a memory subscription's parts share: the stored message, its entry in a subscription, keys and lanes. */
import type { AttemptRecord } from '../../core/backbone.ts';
import type { Clock, ClockTimer } from '../../core/clock.ts';
import type { Envelope } from '../../core/envelope.ts';
import { Deque } from '../deque.ts';
import { ReadyKeys } from './fair.ts';
import type { MemoryTransaction } from '../transaction.ts';
import type { BackboneObserver } from '../../telemetry/observer.ts';

/** A committed message, as the log keeps it: shared by every subscription, never mutated. */
export interface Stored {
  /** Commit order across the backbone (a dead letter's `position`). */
  readonly seq: number;
  readonly envelope: Envelope;
  /** The data as JSON: every delivery parses its own copy, as a real backbone would hand it over. */
  readonly json: string;
  readonly keyHash: number;
}

/** One message waiting in, or moving through, one subscription. */
export interface Entry {
  readonly message: Stored;
  /** Attempts made so far (a redrive starts again from 0, as PostgreSQL's does). */
  attempts: number;
  history: AttemptRecord[];
}

/** What a subscription needs from the backbone. */
export interface GroupContext {
  /** A transaction for one handler attempt. */
  begin(what: string): MemoryTransaction;
  /** Commits (true) or rolls back a handler attempt's transaction. */
  end(tx: MemoryTransaction, commit: boolean): void;
  deadLetter(subscription: string, entry: Entry, reason: string): void;
  /** The subscription may have become idle: drain() waiters look again. */
  settled(): void;
  /** The subscription's topics changed: publishes route by the new ones from now on. */
  retopic(): void;
  warn(message: string, error?: unknown): void;
  readonly maxInbox: number;
  /** The clock of delayed retries. */
  readonly clock: Clock;
  /** The bus's telemetry, once it handed it over (Backbone.observe): the workers' receive spans. */
  observer(): BackboneObserver | undefined;
}

/** A worker as its subscription sees it: the topics it handles and the lanes it holds (worker.ts). */
export interface LaneHolder {
  readonly topics: readonly string[];
  /** Lanes this worker holds that have a ready key, in round-robin order. */
  readonly readyLanes: Set<Lane>;
  /** Takes ready keys on a later turn of the event loop. */
  schedule(): void;
}

/** The messages of one key in one subscription: handled one at a time, in commit order. */
export class KeyLine {
  readonly pending = new Deque<Entry>();
  /** A message of this key is being handled. */
  busy = false;
  /** Queued in its lane's `ready` line. */
  ready = false;
  /** When the head's delayed retry is due (0: not waiting). The key's later messages wait behind it. */
  retryAt = 0;
  timer: ClockTimer | undefined;
  constructor(
    readonly key: string,
    readonly lane: Lane,
  ) {}
}

/** One partition of a subscription; a worker holds it while it runs. */
export class Lane {
  readonly keys = new Map<string, KeyLine>();
  /** Keys with a message that can be handled now, in the order they became ready (by tenant, if fair). */
  readonly ready = new ReadyKeys();
  owner: LaneHolder | undefined;
  constructor(readonly index: number) {}
}
