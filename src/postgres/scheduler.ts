import { hostname } from 'node:os';
import type { SqlDriver } from './connection/driver.ts';
import type { Notifier } from './notifier.ts';
import type { Statements } from './statements.ts';

interface SchedulerSettings {
  readonly leaseMs: number;
  /** How often the leader renews its lease and the others try to take it. */
  readonly heartbeatMs: number;
  /** Messages moved into the log per statement. */
  readonly batchSize: number;
}

/** The signal (notifier.ts) a commit that scheduled a message soon sends, to wake the leader. */
export const SCHEDULED_SIGNAL = 'scheduled';
const ROLE = 'scheduler';
/** How soon a leader tries again when due messages could not be moved (locked by a cancel in progress). */
const MOVE_AGAIN_MS = 20;

/**
 * Moves scheduled messages (the `scheduled` table, migration 007) into the log when they are due. One
 * process of all those on the database does it at a time, the leader, holding a lease it renews: one leader
 * keeps a key's due messages in due order. It sleeps until the next message is due (or the next renewal),
 * and a commit that schedules a message due sooner wakes it (the `scheduled` signal); then it moves what is
 * due, a batch per statement, and wakes the consumers of the topics it moved to. Another process takes over
 * when its lease expires, so a leader killed with -9 delays due messages by at most `leaseMs`.
 */
export class Scheduler {
  /** This process's candidate for the role (a worker of this process, as far as the notifier is concerned). */
  readonly owner = `${hostname()}:${process.pid}:scheduler:${Math.random().toString(36).slice(2, 10)}`;
  #stopped = false;
  #loop: Promise<void> | undefined;
  #wakeUp: (() => void) | undefined;
  #woken = false;
  /** When this process last took or renewed the lease (0: it does not lead). */
  #renewedAt = 0;
  #unsignal: (() => void) | undefined;

  constructor(
    private readonly driver: SqlDriver,
    private readonly sql: Statements,
    private readonly notifier: Notifier,
    private readonly settings: SchedulerSettings,
    private readonly warn: (message: string, error?: unknown) => void,
  ) {}

  start(): void {
    this.#unsignal = this.notifier.onSignal(SCHEDULED_SIGNAL, () => this.wake());
    this.#loop = this.#run();
  }

  /** Something was scheduled that may be due before the leader's next wake-up. */
  wake(): void {
    this.#woken = true;
    this.#wakeUp?.();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    this.#unsignal?.();
    this.#wakeUp?.();
    await this.#loop;
    // Hand the role over at once rather than when the lease expires.
    await this.driver.query(this.sql.resignScheduler, [ROLE, this.owner]).catch(() => undefined);
  }

  async #run(): Promise<void> {
    let failures = 0;
    while (!this.#stopped) {
      let wait: number;
      try {
        this.#woken = false;
        wait = await this.#beat();
        failures = 0;
      } catch (error) {
        failures++;
        wait = Math.min(this.settings.heartbeatMs, 100 * 2 ** failures);
        this.warn(`Scheduler: ${(error as Error).message}; retrying in ${wait} ms`, error);
      }
      if (!this.#woken) await this.#sleep(wait);
    }
  }

  /**
   * Leads if it can; as leader, moves what is due. Returns how long to sleep. The lease is renewed once per
   * heartbeat, not before every move: each move checks it is still held, and says when the next is due.
   */
  async #beat(): Promise<number> {
    const { driver, sql, settings } = this;
    let next: number | null;
    if (Date.now() - this.#renewedAt >= settings.heartbeatMs) {
      const { rows } = await driver.query<{ next_ms: number | null }>(sql.leadScheduler, [ROLE, this.owner, settings.leaseMs]);
      if (rows.length === 0) {
        this.#renewedAt = 0;
        return settings.heartbeatMs; // another process leads
      }
      this.#renewedAt = Date.now();
      next = rows[0]!.next_ms;
    } else {
      next = 0; // woken: something may be due
    }
    const untilRenewal = Math.max(0, this.#renewedAt + settings.heartbeatMs - Date.now());
    while (next !== null && next <= 0 && !this.#stopped) {
      const { rows } = await driver.query<{ topics: Record<string, number> | null; next_ms: number | null }>(sql.moveDue, [
        ROLE,
        this.owner,
        settings.batchSize,
      ]);
      const topics = Object.keys(rows[0]?.topics ?? {});
      next = rows[0]?.next_ms ?? null;
      // Nothing moved though something is due: those rows are locked (a cancel), or the lease just went.
      if (topics.length === 0) {
        if (next !== null && next <= 0) return MOVE_AGAIN_MS;
        break;
      }
      this.notifier.poke(topics);
    }
    if (this.#stopped) return 0;
    return Math.min(untilRenewal, next ?? Number.POSITIVE_INFINITY);
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, Math.max(0, ms));
      const self = this;
      function done() {
        clearTimeout(timer);
        self.#wakeUp = undefined;
        resolve();
      }
      this.#wakeUp = done;
      if (this.#stopped) done();
    });
  }
}
