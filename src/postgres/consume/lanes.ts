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
 * see migration 017 and `statements.readLanes`. So its first read costs a batch, however large the window
 * (test/backlog.pg.test.ts). A snapshot's floor is taken with it, when its window is opened (`hi`,
 * `windowNextXid`), and becomes `done`'s when the window is done.
 */
export interface Lane extends Cursor {
  readonly partition: number;
  readonly epoch: string;
  /**
   * Tenants split off this lane (fair reads, see `LaneReader`): each read on from its own cursor, while the
   * lane's own skips their messages. A tenant joins the lane again once both cursors close a window at
   * the same snapshot. Empty unless the subscription is fair.
   */
  tenants: ReadonlyMap<string, Cursor>;
}

/** Where one reader of a lane has read to: the lane's own, or that of a tenant split off it. */
export interface Cursor {
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

export type LaneCursor = Cursor & { tenants: ReadonlyMap<string, Cursor> };

/** A tenant's cursor as the `cursors.tenants` column stores it; its floors are not kept (unknown after a restart: a whole first read, as before 017). */
type StoredCursor = { done: string; window: string | null; position: number | null };

/**
 * A window's first read walks from its floor to its `hi`, stopping at a full batch; each read after it spans
 * `batchSize` x this many positions at first, sparse ranges doubling it, up to the maximum.
 */
const MIN_SPAN_BATCHES = 1;
const MAX_SPAN = 1_000_000;
/**
 * Fair reads: a tenant takes at most this part of a read (times `batchSize`) from its lane's cursor; one
 * with more is split off onto its own cursor, so the lane's cursor goes on to the other tenants' messages.
 * A split-off cursor reads the batch divided among the tenants the reader has seen in the last
 * ACTIVE_TENANT_MS, at least this part of it: a tenant alone takes whole batches, and beside many quiet
 * tenants a flood takes a twentieth of a batch at a time, so a batch, what a quiet tenant's message waits
 * for, stays short (issue 23: at a quarter, the quiet tenants' p99 was 4x theirs alone).
 */
const FAIR_SHARE = 0.05;
const ACTIVE_TENANT_MS = 1_000;
/** A read is planned again when the log has grown fourfold since its plan, counted from at least this many rows. */
const REPLAN_AFTER_ROWS = 1_000;
/**
 * The read statement's plans in this process, by variant (schema, inbox, every topic, fair): its name's
 * generation and the log's end when that generation was planned. Shared by the readers of a variant, as their
 * prepared statements are: one per generation on each connection (~400 KB each), not one per subscription.
 * See LaneReader.#read.
 */
const readPlans = new Map<string, ReadPlan>();
interface ReadPlan {
  generation: number;
  logEnd: number;
}

/** A lane as its lease was acquired: the cursor stored for it (see `statements.acquire`). */
export function acquiredLane(spec: SubscriptionSpec, row: AcquiredCursor): Lane {
  const number = (value: string | number | null) => (value === null ? null : Number(value));
  const span = spec.batchSize * MIN_SPAN_BATCHES;
  const tenants = new Map<string, Cursor>();
  for (const [tenant, cursor] of Object.entries(row.tenants ?? {})) {
    const { done, window, position } = cursor;
    tenants.set(tenant, { done, doneLast: null, doneNextXid: null, window, position: number(position), hi: null, windowNextXid: null, span });
  }
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
    span,
    tenants,
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
  tenants: Record<string, StoredCursor> | null;
}

export function cursorOf(lane: LaneCursor): LaneCursor {
  const { done, doneLast, doneNextXid, window, position, hi, windowNextXid, span, tenants } = lane;
  return { done, doneLast, doneNextXid, window, position, hi, windowNextXid, span, tenants };
}

/** A window of the lane is being worked through: its own, or that of a tenant split off it. */
export function windowOpen(lane: LaneCursor): boolean {
  if (lane.window !== null) return true;
  for (const tenant of lane.tenants.values()) if (tenant.window !== null) return true;
  return false;
}

/** The tenants' cursors of a lane as the acknowledgement stores them (`cursors.tenants`); null if none. */
export function storedTenants(cursor: LaneCursor): string | null {
  if (cursor.tenants.size === 0) return null;
  const stored: Record<string, StoredCursor> = {};
  for (const [tenant, { done, window, position }] of cursor.tenants) stored[tenant] = { done, window, position };
  return JSON.stringify(stored);
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
  readonly rows: Promise<ReadRows>;
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
  /** Fair reads: a row past its tenant's share, returned only to say the tenant has more (not handled). */
  beyond?: boolean;
};

/** What one read returned, and what a split-off tenant's cursor (at weight 1) could read in it. */
interface ReadRows {
  readonly rows: ReadRow[];
  readonly take: number;
}

/** Who reads which messages of a lane: its own cursor (`tenant` undefined: every tenant not split off), or a split-off tenant's. */
interface Reader {
  readonly lane: Lane;
  readonly tenant: string | undefined;
}

/** Readers at the same cursor, of the same tenant (or of the same tenants left out), read together by one scan. */
interface ReadGroup {
  readonly readers: Reader[];
  readonly cursor: Cursor;
  readonly tenant: string | undefined;
  /** Tenants the lanes' own cursors leave out: those split off. */
  readonly except: readonly string[];
}

/**
 * Reads the lanes' next messages, all lanes in one statement: lanes at the same cursor as one group, with
 * one scan; after a read that finds them caught up, lanes read in the same statement share their new
 * `done`, so groups merge by themselves.
 *
 * Fair reads (a subscription with `tenantConcurrency` or `tenantWeights`): a lane's cursor reads in commit
 * order too, but a tenant takes at most a share of each read (FAIR_SHARE, times its weight in
 * `tenantWeights`). A tenant with more in the read is split off at its last row taken: from there it reads
 * on from its own cursor (in the same window), its share of every read, while the lane's cursor goes on
 * without it, so a backlog is read beside the other tenants' new messages instead of ahead of them. Each
 * cursor reads every message of its tenants once, in order, so a key keeps its order. When the tenant's
 * cursor and the lane's close a window at the same snapshot (both caught up), the tenant joins the lane's
 * cursor again.
 */
export class LaneReader {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  readonly #fair: boolean;
  /** Fair reads: a tenant's share of a read from a lane's cursor (FAIR_SHARE) at weight 1. */
  readonly #share: number;
  /** Fair reads: when each tenant was last seen in a read (null's as ''): those of the last ACTIVE_TENANT_MS share reads. */
  readonly #seen = new Map<string, number>();
  readonly #started = Date.now();
  #ahead: ReadAhead | undefined;
  /** The warm-up sent at start (see warm), awaited before stopping so that no statement is left behind. */
  #warming: Promise<void> | undefined;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#fair = spec.tenantShares !== undefined;
    this.#share = Math.max(1, Math.floor(spec.batchSize * FAIR_SHARE));
  }

  /** The next batch of `lanes`, from the read sent ahead if it read from where they are. */
  async next(lanes: readonly Lane[]): Promise<ReadBatch> {
    const spec = this.#spec;
    const groups = groupReaders(lanes);
    const ahead = this.#ahead;
    this.#ahead = undefined;
    const { rows, take } = await (ahead !== undefined && ahead.cursors === cursorsKey(groups) ? ahead.rows : this.#read(groups));
    if (this.#fair) {
      const now = Date.now();
      for (const row of rows) if (row.position !== null) this.#seen.set(row.tenant ?? '', now);
    }
    const perGroup = new Map<number, { rows: ReadRow[]; window: string; hi: number; nextXid: string | null; rangeEnd: number }>();
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
    const next = new Map<number, LaneCursor>(lanes.map((lane) => [lane.partition, cursorOf(lane)]));
    const batch: LogRow[] = [];
    const partitionOf = new Map<LogRow, number>();
    const withRows = new Set<Lane>();
    const minSpan = spec.batchSize * MIN_SPAN_BATCHES;
    for (const [index, group] of groups.entries()) {
      const entry = perGroup.get(index);
      if (entry === undefined) continue;
      const first = group.cursor;
      const full = entry.rows.length === (group.tenant === undefined ? spec.batchSize : this.#shareOf(group.tenant, take));
      const { done, doneLast, doneNextXid } = first;
      const window = { window: entry.window, hi: entry.hi, windowNextXid: first.window === null ? entry.nextXid : first.windowNextXid };
      let moved: Cursor;
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
      // Tenants past their share: each is split off at its last row taken, in this window.
      const split = new Map<string, Cursor>();
      for (const row of entry.rows) {
        if (row.beyond !== true || row.tenant === null) continue;
        const taken = entry.rows.filter((other) => other.tenant === row.tenant && other.beyond !== true);
        split.set(row.tenant, { done, doneLast, doneNextXid, ...window, position: Number(taken[taken.length - 1]!.position), span: minSpan });
      }
      more ||= split.size > 0;
      for (const { lane, tenant } of group.readers) {
        const cursor = next.get(lane.partition)!;
        if (tenant === undefined) Object.assign(cursor, moved);
        const tenants = new Map(cursor.tenants);
        if (tenant !== undefined) tenants.set(tenant, moved);
        for (const [splitTenant, at] of split) tenants.set(splitTenant, at);
        cursor.tenants = tenants;
      }
      let handled = 0;
      for (const row of entry.rows) {
        if (row.beyond === true) continue;
        handled++;
        batch.push(row);
        partitionOf.set(row, Number(row.partition));
      }
      if (handled > 0) for (const { lane } of group.readers) withRows.add(lane);
    }
    for (const cursor of next.values()) rejoin(cursor);
    return { rows: batch, partitionOf, next, withRows: [...withRows], more, handledBefore: ahead?.handledBefore ?? new Set<string>() };
  }

  /**
   * Sends the read of the batch after this one, from the cursors this one moves the lanes to, so the server
   * scans it while this batch is handled and acknowledged. Its `seen` flags are taken before this batch's
   * inbox rows (and those of `acking`, still in flight) commit, so those ids are passed on and count as seen.
   * It is used by `next` only once `keep` says the batch went through.
   */
  prefetch(lanes: readonly Lane[], next: ReadonlyMap<number, LaneCursor>, acking: ReadonlySet<string> | undefined): ReadAhead {
    const groups = groupReaders(lanes.map((lane) => ({ ...lane, ...next.get(lane.partition) })));
    const rows = this.#read(groups);
    rows.catch(() => undefined); // a read that fails is read again, or reports when it is used
    return { cursors: cursorsKey(groups), rows, handledBefore: new Set(acking) };
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
    await this.#warming;
    await this.#ahead?.rows.catch(() => undefined);
    this.#ahead = undefined;
  }

  /** What a split-off tenant's cursor reads at once in a read made with `take` (see #take), times its weight (as `statements.readLanes` has it). */
  #shareOf(tenant: string, take: number): number {
    return Math.max(1, Math.floor(take * (this.#spec.tenantShares?.weights[tenant] ?? 1)));
  }

  /** What a split-off tenant's cursor reads at once at weight 1: the batch among the tenants seen lately, at least its fair share. */
  #take(): number {
    const now = Date.now();
    // Who else is active is known only after a while of reading.
    if (now - this.#started < ACTIVE_TENANT_MS) return this.#share;
    const since = now - ACTIVE_TENANT_MS;
    for (const [tenant, at] of this.#seen) if (at < since) this.#seen.delete(tenant);
    return Math.max(this.#share, Math.floor(this.#spec.batchSize / Math.max(1, this.#seen.size)));
  }

  /**
   * Opens the reader's connections and plans its read on each (two where Tidings opens them: connection/pg.ts),
   * with a read of no lanes, which scans nothing, so that the subscription's first reads wait for neither
   * (on a slow machine ~15 ms to connect and ~50 ms to plan, what the first messages of a backlog waited for).
   * Not awaited: the first read queues behind it on its connection. A failure is left to the reads to meet.
   * Both at once, a trade measured on two cores (docs/tenancy.md, "Fair delivery"): the quiet tenants' delivery
   * p99 beside a noisy backlog fell by a third, the first message of a backlog came ~10 ms later; planned one
   * after the other, neither moved beyond the machine's noise.
   */
  warm(): void {
    const { name, text } = this.#statement();
    const params = this.#params([], this.#share);
    this.#warming = Promise.all([0, 1].map(() => this.#ctx.driver.planned(name, text, params).catch(() => undefined))).then(() => undefined);
  }

  /** One statement reading the next messages of every group of lanes. */
  async #read(groups: ReadGroup[]): Promise<ReadRows> {
    const take = this.#fair ? this.#take() : 0;
    const { name, text, plan, generation } = this.#statement();
    const { rows } = await this.#ctx.driver.planned<ReadRow>(name, text, this.#params(groups, take));
    planAfterRead(plan, generation, Number(rows[0]?.hi ?? 0));
    return { rows, take };
  }

  /** The read statement of this reader's variant, named by the generation of its plan (see planAfterRead). */
  #statement(): { name: string; text: string; plan: ReadPlan; generation: number } {
    const { sql } = this.#ctx;
    const spec = this.#spec;
    const everyTopic = spec.topics.includes(EVERY_TOPIC);
    const variant = `${sql.schema}.${spec.inbox}.${everyTopic}.${this.#fair}`;
    let plan = readPlans.get(variant);
    if (plan === undefined) readPlans.set(variant, (plan = { generation: 0, logEnd: -1 }));
    const { generation } = plan;
    return { name: `tidings.${variant}.read.${generation}`, text: sql.readLanes(spec.inbox, everyTopic, this.#fair), plan, generation };
  }

  /** The read's parameters for `groups` (see `statements.readLanes`); `take`: what a split-off tenant's cursor reads at weight 1. */
  #params(groups: ReadGroup[], take: number): unknown[] {
    const spec = this.#spec;
    const params: unknown[] = [
      groups.map((group) => `{${group.readers.map((reader) => reader.lane.partition).join(',')}}`),
      groups.map((group) => group.cursor.done),
      groups.map((group) => group.cursor.window),
      groups.map((group) => group.cursor.position),
      spec.topics,
      spec.partitions,
      spec.batchSize,
      groups.map((group) => group.cursor.hi),
      groups.map((group) => group.cursor.span),
      groups.map((group) => group.cursor.doneLast),
      groups.map((group) => group.cursor.doneNextXid),
    ];
    if (spec.inbox) params.push(spec.name);
    if (this.#fair) {
      params.push(
        groups.map((group) => group.tenant ?? null),
        groups.map((group) => (group.except.length === 0 ? null : JSON.stringify(group.except))),
        this.#share,
        JSON.stringify(spec.tenantShares?.weights ?? {}),
        take,
      );
    }
    return params;
  }
}

/**
 * Counts a read of `plan`'s variant made with its `generation`, which found the log ending at `logEnd`, and
 * moves the variant to a new generation (a new statement name, planned again) once the log has grown
 * fourfold since that generation was planned. A prepared statement keeps the plan it was given (a forced
 * generic plan: see connection/pg.ts); one made on a small log scans it sequentially, which costs
 * milliseconds once it holds thousands, where nothing analyzes the tables (autovacuum off), and until
 * autovacuum does where it is on. Not sooner: planning costs milliseconds (~25 ms on a slow machine, on each
 * of the reader's connections), and a read waits for it (test/plans.pg.test.ts). The inbox needs no new
 * plan as it grows: its lookup is planned to probe it row by row whatever its size (statements.readLanes).
 */
function planAfterRead(plan: ReadPlan, generation: number, logEnd: number): void {
  // Another reader may have moved the variant on meanwhile.
  if (plan.generation !== generation) return;
  if (plan.logEnd < 0) plan.logEnd = logEnd;
  else if (logEnd > 4 * Math.max(plan.logEnd, REPLAN_AFTER_ROWS)) Object.assign(plan, { generation: generation + 1, logEnd: -1 });
}

/** A split-off tenant whose cursor closed a window at the snapshot the lane's closed one at: it joins the lane's cursor again. */
function rejoin(cursor: LaneCursor): void {
  if (cursor.window !== null || cursor.tenants.size === 0) return;
  const caughtUp = [...cursor.tenants].filter(([, tenant]) => tenant.window === null && tenant.done === cursor.done);
  if (caughtUp.length === 0) return;
  const tenants = new Map(cursor.tenants);
  for (const [tenant] of caughtUp) tenants.delete(tenant);
  cursor.tenants = tenants;
}

/** The lanes' readers at the same cursor, together: each lane's own, and one per tenant split off it. */
function groupReaders(lanes: readonly Lane[]): ReadGroup[] {
  const groups = new Map<string, ReadGroup>();
  const add = (lane: Lane, tenant: string | undefined, cursor: Cursor, except: readonly string[]) => {
    const key = JSON.stringify([tenant ?? null, except, cursor.done, cursor.window, cursor.position]);
    const group = groups.get(key);
    if (group === undefined) groups.set(key, { readers: [{ lane, tenant }], cursor, tenant, except });
    else group.readers.push({ lane, tenant });
  };
  for (const lane of lanes) {
    add(lane, undefined, lane, [...lane.tenants.keys()].sort());
    for (const [tenant, cursor] of lane.tenants) add(lane, tenant, cursor, []);
  }
  return [...groups.values()];
}

/** Everything a read depends on of its lanes. */
function cursorsKey(groups: readonly ReadGroup[]): string {
  return JSON.stringify(
    groups.map(({ readers, cursor, tenant, except }) => [
      readers.map((reader) => reader.lane.partition),
      tenant ?? null,
      except,
      cursor.done,
      cursor.doneLast,
      cursor.doneNextXid,
      cursor.window,
      cursor.position,
      cursor.hi,
      cursor.span,
    ]),
  );
}
