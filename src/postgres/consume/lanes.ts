import { EVERY_TOPIC, type SubscriptionSpec } from '../../core/backbone.ts';
import type { LogRow } from '../codec.ts';
import type { ConsumerContext } from './context.ts';

/**
 * Where a lane (a partition this worker holds) has read to; see the `cursors` table.
 *
 * Commit order without skipping: `done` is a snapshot whose committed messages are all handled. A read
 * takes the current snapshot `window` and returns the messages of transactions that completed after `done`
 * and by `window`, in position order; when the window is exhausted it becomes the new `done`. A transaction
 * that commits late is simply in a later window, however early its rows were numbered, so the classic
 * outbox bug (a bigserial read as "greater than my offset" skips late commits) cannot happen; see
 * test/guarantees.pg.test.ts, "no skipped messages".
 *
 * A window is read in position order from its floor: every message it holds is numbered above `doneLast`,
 * or belongs to one of the few transactions that held an xid when `done` was taken (below `doneNextXid`);
 * see migration 016 and `statements.readLanes`. So its first read costs a batch, however large the window
 * (test/backlog.pg.test.ts). A snapshot's floor is taken with it, when its window is opened (`hi`,
 * `windowNextXid`), and becomes `done`'s when the window is done.
 */
export interface Lane {
  readonly partition: number;
  readonly epoch: string;
  done: string;
  /** The log's last position when `done` was taken (null: unknown, see `doneNextXid`). */
  doneLast: number | null;
  /** The next xid to be assigned when `done` was taken, after `doneLast` was read (null: unknown). */
  doneNextXid: string | null;
  window: string | null;
  position: number | null;
  /** No message of the open window has a higher position: the log's last when it was opened (null: unknown, the log's last now is used). */
  hi: number | null;
  /** The next xid to be assigned when the window was opened, after `hi` was read (null: unknown). */
  windowNextXid: string | null;
  /** Positions scanned by the next read of the open window; grows while reads come back sparse. */
  span: number;
}

export type LaneCursor = Pick<Lane, 'done' | 'doneLast' | 'doneNextXid' | 'window' | 'position' | 'hi' | 'windowNextXid' | 'span'>;

/**
 * A window's first read walks from its floor to its `hi`, stopping at a full batch; each read after it spans
 * `batchSize` x this many positions at first, sparse ranges doubling it, up to the maximum.
 */
const MIN_SPAN_BATCHES = 1;
const MAX_SPAN = 1_000_000;

/** A lane as its lease was acquired: the cursor stored for it (see `statements.acquire`). */
export function acquiredLane(spec: SubscriptionSpec, row: AcquiredCursor): Lane {
  const number = (value: string | number | null) => (value === null ? null : Number(value));
  return {
    partition: row.partition,
    epoch: String(row.epoch),
    done: row.done,
    doneLast: number(row.done_last),
    doneNextXid: row.done_next_xid,
    window: row.window_snapshot,
    position: number(row.window_position),
    hi: number(row.window_last),
    windowNextXid: row.window_next_xid,
    span: spec.batchSize * MIN_SPAN_BATCHES,
  };
}

/** A cursor row as `statements.acquire` returns it. */
export interface AcquiredCursor {
  partition: number;
  epoch: string;
  done: string;
  done_last: string | number | null;
  done_next_xid: string | null;
  window_snapshot: string | null;
  window_position: string | number | null;
  window_last: string | number | null;
  window_next_xid: string | null;
}

export function cursorOf(lane: Lane): LaneCursor {
  const { done, doneLast, doneNextXid, window, position, hi, windowNextXid, span } = lane;
  return { done, doneLast, doneNextXid, window, position, hi, windowNextXid, span };
}

/** What one read found, and where it moves the lanes once its batch is acknowledged. */
export interface ReadBatch {
  /** The messages, in order per lane group. */
  readonly rows: LogRow[];
  readonly partitionOf: ReadonlyMap<LogRow, number>;
  /** Each lane's cursor after this batch. */
  readonly next: ReadonlyMap<number, LaneCursor>;
  /** Lanes of the groups that returned rows: acknowledged together, so a group stays in step in the database too. */
  readonly withRows: Lane[];
  /** A window stays open: more messages may be waiting. */
  readonly more: boolean;
  /** Ids the batch before it handled, which its inbox flags (`seen`) could not know yet (inbox subscriptions). */
  readonly handledBefore: ReadonlySet<string>;
}

/**
 * The next read of every lane, sent while the batch before it was handled (see `LaneReader.prefetch`): used
 * only if the lanes are where it read from when the next batch starts, else dropped and read again.
 */
interface ReadAhead {
  /** The cursors it read from (cursorsKey). */
  readonly cursors: string;
  readonly rows: Promise<ReadRow[]>;
  /** Ids the batch before it handled: its `seen` flags were taken before their inbox rows committed. */
  readonly handledBefore: Set<string>;
}

type ReadRow = LogRow & {
  lane_group: number | string;
  win: string;
  hi: number | string;
  /** An opened window's next xid (null when a window goes on). */
  next_xid: string | null;
  range_end: number | string;
  partition: number;
};

/**
 * Reads the lanes' next messages, all lanes in one statement: lanes at the same cursor as one group, with
 * one scan; after a read that finds them caught up, lanes read in the same statement share their new
 * `done`, so groups merge by themselves.
 */
export class LaneReader {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  /** The log's last position when last read: how large the log has grown (see #read). */
  #logEnd = 0;
  #ahead: ReadAhead | undefined;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec) {
    this.#ctx = ctx;
    this.#spec = spec;
  }

  /** The next batch of `lanes`, from the read sent ahead if it read from where they are. */
  async next(lanes: readonly Lane[]): Promise<ReadBatch> {
    const spec = this.#spec;
    const grouped = groupLanes(lanes);
    const ahead = this.#ahead;
    this.#ahead = undefined;
    const rows = await (ahead !== undefined && ahead.cursors === cursorsKey(grouped) ? ahead.rows : this.#read(grouped));
    const perGroup = new Map<number, { rows: LogRow[]; window: string; hi: number; nextXid: string | null; rangeEnd: number }>();
    for (const row of rows) {
      const index = Number(row.lane_group) - 1;
      let entry = perGroup.get(index);
      if (entry === undefined) {
        entry = { rows: [], window: row.win, hi: Number(row.hi), nextXid: row.next_xid, rangeEnd: Number(row.range_end) };
        perGroup.set(index, entry);
      }
      if (row.position !== null) entry.rows.push(row);
    }
    let more = false;
    const next = new Map<number, LaneCursor>();
    const batch: LogRow[] = [];
    const partitionOf = new Map<LogRow, number>();
    const withRows: Lane[] = [];
    const minSpan = spec.batchSize * MIN_SPAN_BATCHES;
    for (const [index, group] of grouped.entries()) {
      const entry = perGroup.get(index);
      if (entry === undefined) continue;
      const first = group[0]!;
      const full = entry.rows.length === spec.batchSize;
      const { done, doneLast, doneNextXid } = first;
      const window = { window: entry.window, hi: entry.hi, windowNextXid: first.window === null ? entry.nextXid : first.windowNextXid };
      let moved: LaneCursor;
      if (full) {
        // More may wait right after the last row.
        moved = { done, doneLast, doneNextXid, ...window, position: Number(entry.rows[entry.rows.length - 1]!.position), span: first.span };
      } else if (entry.rangeEnd < entry.hi) {
        // The range was sparse: scan on from its end, a wider range next time.
        moved = { done, doneLast, doneNextXid, ...window, position: entry.rangeEnd, span: Math.min(MAX_SPAN, first.span * 2) };
      } else {
        // The window is done; its floor becomes done's.
        moved = {
          done: entry.window,
          doneLast: entry.hi,
          doneNextXid: window.windowNextXid,
          window: null,
          position: null,
          hi: null,
          windowNextXid: null,
          span: minSpan,
        };
      }
      more ||= moved.window !== null;
      for (const lane of group) next.set(lane.partition, moved);
      if (entry.rows.length > 0) withRows.push(...group);
      for (const row of entry.rows) {
        batch.push(row);
        partitionOf.set(row, Number((row as ReadRow).partition));
      }
    }
    return { rows: batch, partitionOf, next, withRows, more, handledBefore: ahead?.handledBefore ?? new Set<string>() };
  }

  /**
   * Sends the read of the batch after this one, from the cursors this one moves the lanes to, so the server
   * scans it while this batch is handled and acknowledged. Its `seen` flags are taken before this batch's
   * inbox rows (and those of `acking`, still in flight) commit, so those ids are passed on and count as seen.
   * It is used by `next` only once `keep` says the batch went through.
   */
  prefetch(lanes: readonly Lane[], next: ReadonlyMap<number, LaneCursor>, acking: ReadonlySet<string> | undefined): ReadAhead {
    const grouped = groupLanes(lanes.map((lane) => ({ ...lane, ...next.get(lane.partition) })));
    const rows = this.#read(grouped);
    rows.catch(() => undefined); // a read that fails is read again, or reports when it is used
    return { cursors: cursorsKey(grouped), rows, handledBefore: new Set(acking) };
  }

  keep(ahead: ReadAhead | undefined): void {
    this.#ahead = ahead;
  }

  /** Drops the read sent ahead (the lanes moved otherwise: a failure, a lease lost). */
  forget(): void {
    this.#ahead = undefined;
  }

  /** Waits for the read sent ahead, if any, so stopping leaves no statement behind. */
  async settle(): Promise<void> {
    await this.#ahead?.rows.catch(() => undefined);
    this.#ahead = undefined;
  }

  /** One statement reading the next messages of every group of lanes. */
  async #read(grouped: Lane[][]): Promise<ReadRow[]> {
    const { driver, sql } = this.#ctx;
    const spec = this.#spec;
    const params: unknown[] = [
      grouped.map((group) => `{${group.map((lane) => lane.partition).join(',')}}`),
      grouped.map((group) => group[0]!.done),
      grouped.map((group) => group[0]!.window),
      grouped.map((group) => group[0]!.position),
      spec.topics,
      spec.partitions,
      spec.batchSize,
      grouped.map((group) => group[0]!.hi),
      grouped.map((group) => group[0]!.span),
      grouped.map((group) => group[0]!.doneLast),
      grouped.map((group) => group[0]!.doneNextXid),
    ];
    if (spec.inbox) params.push(spec.name);
    const everyTopic = spec.topics.includes(EVERY_TOPIC);
    // A prepared statement keeps the plan it was given while the log was small (a sequential scan, which
    // costs milliseconds once the log holds thousands): a new name each time the log grows fourfold plans it again.
    const scale = Math.floor(Math.log2(this.#logEnd + 1) / 2);
    const name = `tidings.${sql.schema}.read.${spec.inbox}.${everyTopic}.${scale}`;
    const { rows } = await driver.planned<ReadRow>(name, sql.readLanes(spec.inbox, everyTopic), params);
    const hi = Number(rows[0]?.hi ?? 0);
    if (hi > this.#logEnd) this.#logEnd = hi;
    return rows;
  }
}

/** Lanes at the same cursor, together. */
function groupLanes(lanes: readonly Lane[]): Lane[][] {
  const groups = new Map<string, Lane[]>();
  for (const lane of lanes) {
    const key = `${lane.done}|${lane.window}|${lane.position}`;
    const group = groups.get(key);
    if (group === undefined) groups.set(key, [lane]);
    else group.push(lane);
  }
  return [...groups.values()];
}

/** Everything a read depends on of its lanes. */
function cursorsKey(grouped: readonly Lane[][]): string {
  return JSON.stringify(
    grouped.map((group) => {
      const { done, doneLast, doneNextXid, window, position, hi, span } = group[0]!;
      return [group.map((lane) => lane.partition), done, doneLast, doneNextXid, window, position, hi, span];
    }),
  );
}
