import type { AttemptRecord } from '../core/backbone.ts';
import type {
  DeadLetter,
  DeadLetterActionRequest,
  DeadLetterActionResult,
  DeadLetterSelection,
  DeadLetterStore,
  DeadLetterSummary,
} from '../core/dead-letters.ts';
import { requireSelection } from '../core/dead-letters.ts';
import { TidingsError } from '../core/errors.ts';
import { sleep } from '../core/sleep.ts';
import type { Entry, Stored } from './consume/state.ts';

interface DeadRecord {
  readonly id: string;
  readonly subscription: string;
  readonly message: Stored;
  readonly reason: string;
  readonly attempts: AttemptRecord[];
  readonly deadAt: string;
}

/** Rows `list` returns when no limit is given (as the PostgreSQL admin functions). */
const LIST_LIMIT = 100;

/**
 * The memory backbone's dead letters, with the same selection rules as PostgreSQL's (ids are dead-letter
 * ids or message ids; filters combine with AND; redrive and drop need a filter or `all`). Ids count up
 * from 1, so `list` is oldest first. No audit trail is kept: `actor` is accepted and ignored.
 */
export class DeadLetterBook {
  readonly #records = new Map<string, DeadRecord>();
  readonly #max: number;
  readonly #warn: (message: string) => void;
  #next = 1;
  #evicted = 0;

  constructor(max: number, warn: (message: string) => void) {
    this.#max = max;
    this.#warn = warn;
  }

  add(subscription: string, entry: Entry, reason: string): void {
    const id = String(this.#next++);
    this.#records.set(id, { id, subscription, message: entry.message, reason, attempts: [...entry.history], deadAt: new Date().toISOString() });
    if (this.#records.size <= this.#max) return;
    for (const [oldest, record] of this.#records) {
      this.#records.delete(oldest);
      if (this.#evicted++ === 0) {
        this.#warn(
          `The memory backbone keeps at most ${this.#max} dead letters (maxDeadLetters): dropped the oldest, ${record.message.envelope.id} (${record.message.envelope.topic}) of subscription ${record.subscription}, and will keep dropping the oldest; raise maxDeadLetters, or redrive or drop them`,
        );
      }
      break;
    }
  }

  /** The store `backbone.deadLetters()` returns; `redrive` hands entries back through `toSubscription`. */
  store(toSubscription: (subscription: string, entries: Entry[]) => void): DeadLetterStore {
    return {
      list: async (selection) => {
        const matched = this.#select(selection, false);
        const limit = selection.limit ?? LIST_LIMIT;
        return { total: matched.length, deadLetters: matched.slice(0, limit).map(summary) };
      },
      show: async (id) => this.#select({ ids: [id] }, true).map(whole),
      count: async (selection) => this.#select(selection, true).length,
      redrive: (request) =>
        this.#act(request, (records) => {
          const bySubscription = new Map<string, Entry[]>();
          for (const record of records) {
            const entries = bySubscription.get(record.subscription) ?? [];
            // Attempts start again, the id stays: an inbox that handled it since still recognises it.
            entries.push({ message: record.message, attempts: 0, history: [] });
            bySubscription.set(record.subscription, entries);
          }
          for (const [subscription, entries] of bySubscription) toSubscription(subscription, entries);
        }),
      drop: (request) => this.#act(request, () => undefined),
    };
  }

  #select(selection: DeadLetterSelection, requireFilter: boolean): DeadRecord[] {
    const ids = selection.ids === undefined || selection.ids.length === 0 ? undefined : new Set(selection.ids);
    const text = selection.errorText?.toLowerCase();
    if (requireFilter) requireSelection(selection);
    const matched: DeadRecord[] = [];
    for (const record of this.#records.values()) {
      if (ids !== undefined && !ids.has(record.id) && !ids.has(record.message.envelope.id)) continue;
      if (selection.subscription !== undefined && record.subscription !== selection.subscription) continue;
      if (selection.topic !== undefined && record.message.envelope.topic !== selection.topic) continue;
      if (
        text !== undefined &&
        !record.reason.toLowerCase().includes(text) &&
        !record.attempts.some((attempt) => attempt.error.message.toLowerCase().includes(text))
      ) {
        continue;
      }
      matched.push(record);
    }
    return matched;
  }

  /**
   * Redrive or drop what the selection matches now (a redriven message that fails again is not taken
   * again by the same call), in chunks of at most a second's worth of `ratePerSecond`.
   */
  async #act(request: DeadLetterActionRequest, apply: (records: DeadRecord[]) => void): Promise<DeadLetterActionResult> {
    const rate = request.ratePerSecond;
    if (rate !== undefined && !(Number.isFinite(rate) && rate > 0)) {
      throw new TidingsError('INVALID_OPTIONS', `ratePerSecond must be a positive number of messages per second, got ${rate}`);
    }
    const matched = this.#select(request, true);
    const chunkSize = rate === undefined ? Math.max(1, matched.length) : Math.max(1, Math.floor(rate));
    const result = { matched: matched.length, count: 0, bySubscription: {} as { [name: string]: number }, messageIds: [] as string[], stopped: false };
    request.onProgress?.({ done: 0, total: matched.length });
    const started = Date.now();
    for (let offset = 0; offset < matched.length; offset += chunkSize) {
      if (request.signal?.aborted === true) {
        result.stopped = true;
        break;
      }
      // Another call may have taken some since they were selected.
      const chunk = matched.slice(offset, offset + chunkSize).filter((record) => this.#records.delete(record.id));
      apply(chunk);
      for (const record of chunk) {
        result.bySubscription[record.subscription] = (result.bySubscription[record.subscription] ?? 0) + 1;
        result.messageIds.push(record.message.envelope.id);
      }
      result.count += chunk.length;
      request.onProgress?.({ done: result.count, total: matched.length });
      if (rate !== undefined && offset + chunkSize < matched.length) {
        await sleep(started + ((offset + chunkSize) / rate) * 1_000 - Date.now(), request.signal);
      }
    }
    return result;
  }
}

function summary(record: DeadRecord): DeadLetterSummary {
  const { envelope } = record.message;
  return {
    id: record.id,
    subscription: record.subscription,
    messageId: envelope.id,
    topic: envelope.topic,
    key: envelope.partitionkey,
    position: record.message.seq,
    reason: record.reason,
    attempts: record.attempts.length,
    deadAt: record.deadAt,
  };
}

function whole(record: DeadRecord): DeadLetter {
  const { attempts: _count, ...rest } = summary(record);
  return {
    ...rest,
    envelope: { ...record.message.envelope, data: JSON.parse(record.message.json) as unknown },
    attempts: record.attempts.map((attempt) => ({ ...attempt })),
  };
}
