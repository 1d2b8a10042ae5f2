/**
 * Dead letters, whatever keeps them: how an operation selects them, what a store lists and shows, and what
 * redrive and drop report. Every backbone's dead-letters.ts implements DeadLetterStore; the CLI uses only it.
 */
import type { Envelope } from './envelope.ts';
import { TidingsError, type AttemptRecord } from './errors.ts';

/** Which dead letters an operation concerns. Filters combine with AND; `all` stands for no filter. */
export interface DeadLetterSelection {
  /** Dead-letter ids (what `list` shows) or message ids. */
  readonly ids?: readonly string[] | undefined;
  readonly subscription?: string | undefined;
  readonly topic?: string | undefined;
  /** Case-insensitive text in the reason or in any attempt's error message. */
  readonly errorText?: string | undefined;
  /** Required when no filter is given, so that an empty filter never means "everything" by accident. */
  readonly all?: boolean | undefined;
}

export interface DeadLetterSummary {
  readonly id: string;
  readonly subscription: string;
  readonly messageId: string;
  readonly topic: string;
  readonly key: string;
  /** Where the message sits in the source log, if the backbone has one. */
  readonly position: number | null;
  readonly reason: string;
  readonly attempts: number;
  readonly deadAt: string;
}

export interface DeadLetter extends Omit<DeadLetterSummary, 'attempts'> {
  readonly envelope: Envelope;
  readonly attempts: AttemptRecord[];
}

export interface DeadLetterGroup {
  readonly subscription: string;
  /** The reason with numbers and ids masked (`N`, `<id>`), so one error on many messages is one group. */
  readonly pattern: string;
  readonly example: string;
  readonly count: number;
  readonly topics: string[];
  readonly firstAt: string;
  readonly lastAt: string;
}

export interface DeadLetterProgress {
  readonly done: number;
  readonly total: number;
}

export interface DeadLetterActionResult {
  /** Dead letters that matched when the operation began. */
  readonly matched: number;
  /** Dead letters redriven or dropped. Fewer than `matched` if stopped, or if another operator got there first. */
  readonly count: number;
  readonly bySubscription: Record<string, number>;
  readonly messageIds: string[];
  readonly stopped: boolean;
}

export interface DeadLetterActionRequest extends DeadLetterSelection {
  /** Who does this, for the audit trail: defaults to the OS user and host (`alice@ops-1`). */
  readonly actor?: string | undefined;
  readonly onProgress?: ((progress: DeadLetterProgress) => void) | undefined;
  /** Stops between chunks; what was done stays done. */
  readonly signal?: AbortSignal | undefined;
  /** Redrive only: at most this many messages per second; unlimited when absent. */
  readonly ratePerSecond?: number | undefined;
}

/**
 * Dead letters of one backbone, as the CLI (`tidings dead-letters ...`) sees them. Redrive hands a message
 * back to its subscription with its id unchanged, so inboxes still de-duplicate it.
 */
export interface DeadLetterStore {
  list(selection: DeadLetterSelection & { readonly limit?: number | undefined }): Promise<{ total: number; deadLetters: DeadLetterSummary[] }>;
  /** One row per subscription and error, largest first. Stores that cannot group themselves leave it to `groupDeadLetters`. */
  group?(selection: DeadLetterSelection & { readonly limit?: number | undefined }): Promise<DeadLetterGroup[]>;
  /** A dead-letter id, or a message id (which may have died in several subscriptions). */
  show(id: string): Promise<DeadLetter[]>;
  count(selection: DeadLetterSelection): Promise<number>;
  redrive(request: DeadLetterActionRequest): Promise<DeadLetterActionResult>;
  drop(request: DeadLetterActionRequest): Promise<DeadLetterActionResult>;
}

/**
 * Refuses a selection that names nothing and does not say `all`, so that a forgotten filter never means
 * "every dead letter". An empty id list names nothing, as an absent one.
 */
export function requireSelection(selection: DeadLetterSelection): void {
  const named = (selection.ids?.length ?? 0) > 0 || selection.subscription !== undefined || selection.topic !== undefined || selection.errorText !== undefined;
  if (!named && selection.all !== true) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      'Name the dead letters (by ids, subscription, topic or error text), or select all of them explicitly with all: true',
    );
  }
}

const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/gi;

/** Groups listed dead letters by subscription and masked reason, largest group first (as PostgreSQL does in SQL). */
export function groupDeadLetters(letters: readonly DeadLetterSummary[], limit = Number.POSITIVE_INFINITY): DeadLetterGroup[] {
  const groups = new Map<
    string,
    { subscription: string; pattern: string; example: string; count: number; topics: Set<string>; firstAt: string; lastAt: string }
  >();
  for (const letter of letters) {
    const pattern = letter.reason.replace(UUID, '<id>').replace(/[0-9]+/g, 'N');
    const id = JSON.stringify([letter.subscription, pattern]);
    const group = groups.get(id);
    if (group === undefined) {
      groups.set(id, {
        subscription: letter.subscription,
        pattern,
        example: letter.reason,
        count: 1,
        topics: new Set([letter.topic]),
        firstAt: letter.deadAt,
        lastAt: letter.deadAt,
      });
      continue;
    }
    group.count++;
    group.topics.add(letter.topic);
    if (letter.reason < group.example) group.example = letter.reason;
    if (letter.deadAt < group.firstAt) group.firstAt = letter.deadAt;
    if (letter.deadAt > group.lastAt) group.lastAt = letter.deadAt;
  }
  return [...groups.values()]
    .sort((a, b) => b.count - a.count || a.subscription.localeCompare(b.subscription) || a.pattern.localeCompare(b.pattern))
    .slice(0, limit)
    .map((group) => ({ ...group, topics: [...group.topics].sort() }));
}
