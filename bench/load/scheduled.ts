/**
 * Scheduled delivery (issue 21): `events` jobs due over `scheduledSeconds`, in 10 ms slots, the first slot
 * `scheduleLeadMs` after the task began (time enough to schedule them all first). Every system gets the same
 * due times; its handler reports each job's seq as it starts, and lateness is start minus due (wall clock,
 * which the database's and Redis's due times use too).
 */
import type { ChildResult, Task } from '../protocol.ts';
import { Counter, percentile } from './measure.ts';

const SLOT_MS = 10;

export class Schedule {
  readonly base: number;
  readonly perSlot: number;
  readonly #lateness: number[] = [];
  readonly #seen = new Set<number>();
  readonly #handled = new Counter();
  #last = 0;
  #scheduled = { ms: 0, end: 0 };

  constructor(readonly task: Task) {
    this.base = Date.now() + task.scheduleLeadMs;
    const slots = Math.max(1, Math.round((task.scheduledSeconds * 1_000) / SLOT_MS));
    this.perSlot = Math.ceil(task.events / slots);
  }

  /** When job `seq` is due (epoch ms). */
  dueOf(seq: number): number {
    return this.base + Math.floor(seq / this.perSlot) * SLOT_MS;
  }

  /** The jobs in due order, in chunks of at most `size` that share one due time when `oneDuePerChunk`. */
  chunks(size: number, oneDuePerChunk: boolean): number[][] {
    const step = oneDuePerChunk ? Math.min(size, this.perSlot) : size;
    const out: number[][] = [];
    for (let first = 0; first < this.task.events; first += step) {
      out.push(Array.from({ length: Math.min(step, this.task.events - first) }, (_, i) => first + i));
    }
    return out;
  }

  /** Schedules every job with `add(chunk)`, timing it. */
  async scheduleAll(size: number, oneDuePerChunk: boolean, add: (seqs: number[]) => Promise<unknown>): Promise<void> {
    const t0 = Date.now();
    for (const chunk of this.chunks(size, oneDuePerChunk)) await add(chunk);
    this.#scheduled = { ms: Date.now() - t0, end: Date.now() };
  }

  /** A handler started on job `seq` (a second start of one job is not counted). */
  started(seq: number): void {
    if (this.#seen.has(seq)) return;
    this.#seen.add(seq);
    const at = Date.now();
    this.#lateness.push(at - this.dueOf(seq));
    this.#last = at;
    this.#handled.add();
  }

  async done(): Promise<ChildResult> {
    await this.#handled.until(this.task.events, this.task.timeoutMs, 'scheduled jobs handled');
    const sorted = [...this.#lateness].sort((a, b) => a - b);
    return {
      ok: true,
      metrics: {
        events: this.task.events,
        deliveredRate: (this.task.events * 1_000) / Math.max(1, this.#last - this.base),
        lateP50: percentile(sorted, 50),
        lateP99: percentile(sorted, 99),
        lateMax: sorted[sorted.length - 1] ?? Number.NaN,
        early: sorted.filter((ms) => ms < 0).length,
        insertRate: (this.task.events * 1_000) / Math.max(1, this.#scheduled.ms),
        // Scheduling that ended after the first due time makes the early slots late by its own slowness.
        scheduledAfterFirstDueMs: Math.max(0, this.#scheduled.end - this.base),
      },
    };
  }
}
