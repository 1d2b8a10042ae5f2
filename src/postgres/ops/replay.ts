/**
 * Replay: a subscription handles the log again from a position or a time. To *replay* is to move every
 * cursor of a subscription back to a position, so its partitions read the log again from there.
 */
import { TidingsError } from '../../core/errors.ts';
import type { Queryable, SqlDriver } from '../connection/driver.ts';
import { replayStatements } from '../sql/replay.ts';
import { explainMissingSchema, unknownSubscription } from './schema.ts';

export interface ReplayOptions {
  readonly schema: string;
  readonly subscription: string;
  /** Handle again every message from this log position on. */
  readonly fromPosition?: number | undefined;
  /** Handle again every message published at or after this time (the first position at or after it). */
  readonly fromTime?: Date | string | undefined;
}

export interface ReplayResult {
  readonly subscription: string;
  readonly fromPosition: number;
  readonly partitions: number;
  /** Messages of its topics at or after `fromPosition` that the subscription will now handle (again). */
  readonly messages: number;
  /** Inbox records removed so that the replayed messages are not de-duplicated away. */
  readonly inboxCleared: number;
  /** Messages before `fromPosition` that had not been handled yet: moving the cursors skips them. */
  readonly skipped: number;
}

/**
 * Moves every cursor of a subscription to `fromPosition`: its partitions read the log again from there,
 * in commit order. A cursor becomes an open window (`done` empty, the window the current snapshot, the
 * position just before `fromPosition`), and its epoch is bumped with the owner cleared: a running worker's
 * next acknowledgement is refused by the epoch fence, so it drops the partition (rolling back that batch)
 * and takes it again, from the new cursor, on its next heartbeat. One transaction, so the inbox records
 * of the replayed messages disappear exactly when the cursors move.
 */
export async function replaySubscription(driver: SqlDriver, options: ReplayOptions): Promise<ReplayResult> {
  const sql = replayStatements(options.schema);
  if ((options.fromPosition === undefined) === (options.fromTime === undefined)) {
    throw new TidingsError('INVALID_OPTIONS', 'replay needs exactly one of fromPosition (a log position) or fromTime (a time)');
  }
  if (options.fromPosition !== undefined && !(Number.isSafeInteger(options.fromPosition) && options.fromPosition >= 1)) {
    throw new TidingsError('INVALID_OPTIONS', `fromPosition must be a log position (an integer from 1), got ${options.fromPosition}`);
  }
  const fromTime = options.fromTime === undefined ? undefined : new Date(options.fromTime);
  if (fromTime !== undefined && Number.isNaN(fromTime.getTime())) {
    throw new TidingsError('INVALID_OPTIONS', `fromTime must be a time, got ${String(options.fromTime)}`);
  }
  return explainMissingSchema(options.schema, () =>
    driver.transaction(async (tx) => {
      const { rows: subs } = await tx.query<{ topics: string[]; partitions: number }>(sql.lockSubscription, [options.subscription]);
      const sub = subs[0];
      if (sub === undefined) throw await unknownSubscription(tx, options.schema, options.subscription);
      const from = options.fromPosition ?? (await firstPositionAt(tx, { schema: options.schema, time: fromTime!, topics: sub.topics }));
      // Row locks on the cursors wait for in-flight acknowledgements, so nothing moves them under us.
      await tx.query(sql.lockCursors, [options.subscription]);
      const { rows: skipped } = await tx.query<{ skipped: string | number }>(sql.skipped, [options.subscription, from]);
      await tx.query(sql.moveCursors, [options.subscription, from - 1]);
      const cleared = await tx.query(sql.clearInbox, [options.subscription, from, sub.topics]);
      const { rows: count } = await tx.query<{ messages: string | number }>(sql.countFrom, [from, sub.topics]);
      return {
        subscription: options.subscription,
        fromPosition: from,
        partitions: Number(sub.partitions),
        messages: Number(count[0]?.messages ?? 0),
        inboxCleared: cleared.rowCount ?? 0,
        skipped: Number(skipped[0]?.skipped ?? 0),
      };
    }),
  );
}

export interface PositionAtOptions {
  readonly schema: string;
  readonly time: Date | string;
  readonly topics: readonly string[];
}

/**
 * The first log position of `topics` published at or after `time`; past the end of the log when there is
 * none. Publication time follows position closely but not exactly (clocks, commit order), which is
 * precise enough to say where a replay or a tail begins.
 */
export async function firstPositionAt(db: Queryable, options: PositionAtOptions): Promise<number> {
  const sql = replayStatements(options.schema);
  const { rows } = await explainMissingSchema(options.schema, () =>
    db.query<{ position: string }>(sql.firstPositionAt, [new Date(options.time).toISOString(), options.topics]),
  );
  return Number(rows[0]!.position);
}
