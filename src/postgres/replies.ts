import type { Reply } from '../core/backbone.ts';
import type { ErrorRecord } from '../core/errors.ts';
import type { SqlDriver } from './connection/driver.ts';
import type { Notifier } from './notifier.ts';
import type { Statements } from './statements.ts';

/** The signal (notifier.ts) a commit that answered a request sends: waiting processes look for their answers. */
export const REPLY_SIGNAL = 'reply';

/** How long an answer to a request that timed out is still looked for, to count it as late. */
const LATE_WINDOW_MS = 60_000;

interface Waiting {
  readonly resolve: (reply: Reply) => void;
  readonly late: () => void;
  /** Set once the requester stopped waiting: a reply then is only counted. */
  until?: number;
}

/**
 * The requests this process waits for answers to (`replies`, migration 009). It costs nothing while none is
 * open; while some are, a `reply` signal (sent by every commit that answers a request, in this process or by
 * NOTIFY in another) makes it take theirs in one statement, and it looks anyway every `pollMs` in case a
 * notification was lost.
 */
export class ReplyWaiter {
  readonly #waiting = new Map<string, Waiting>();
  #timer: NodeJS.Timeout | undefined;
  #taking: Promise<void> | undefined;
  #again = false;
  #unsignal: (() => void) | undefined;

  constructor(
    private readonly driver: SqlDriver,
    private readonly sql: Statements,
    private readonly notifier: Notifier,
    private readonly pollMs: number,
    private readonly warn: (message: string, error?: unknown) => void,
  ) {}

  await(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      const waiting: Waiting = { resolve, late };
      this.#waiting.set(requestId, waiting);
      signal.addEventListener(
        'abort',
        () => {
          waiting.until = Date.now() + LATE_WINDOW_MS;
          reject(signal.reason);
        },
        { once: true },
      );
      this.#unsignal ??= this.notifier.onSignal(REPLY_SIGNAL, () => this.take());
      this.#poll();
    });
  }

  /** Takes the answers that arrived for the requests waited for (and those late), in one statement. */
  take(): void {
    if (this.#taking !== undefined) {
      this.#again = true;
      return;
    }
    this.#taking = this.#take()
      .catch((error: unknown) => this.warn('Could not read the answers to requests; reading again shortly', error))
      .finally(() => {
        this.#taking = undefined;
        if (this.#again) {
          this.#again = false;
          this.take();
        }
      });
  }

  async #take(): Promise<void> {
    const now = Date.now();
    for (const [id, waiting] of this.#waiting) if (waiting.until !== undefined && waiting.until < now) this.#waiting.delete(id);
    if (this.#waiting.size === 0) return this.#idle();
    const { rows } = await this.driver.query<{ request_id: string; data: unknown; error: ErrorRecord | null }>(this.sql.takeReplies, [
      [...this.#waiting.keys()],
    ]);
    for (const row of rows) {
      const waiting = this.#waiting.get(row.request_id);
      this.#waiting.delete(row.request_id);
      if (waiting === undefined) continue;
      if (waiting.until !== undefined) waiting.late();
      else waiting.resolve(row.error === null ? { data: row.data } : { error: row.error });
    }
  }

  /** While answers are awaited, looks every `pollMs` whatever the notifications say. */
  #poll(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => this.take(), this.pollMs);
    this.#timer.unref();
  }

  #idle(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.#unsignal?.();
    this.#unsignal = undefined;
  }

  close(): void {
    this.#idle();
  }
}
