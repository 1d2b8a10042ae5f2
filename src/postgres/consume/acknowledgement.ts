import type { AttemptRecord, SubscriptionSpec } from '../../core/backbone.ts';
import type { Envelope } from '../../core/envelope.ts';
import { preparing, runStatement, type SqlDriver, type Statement } from '../connection/driver.ts';
import type { Statements } from '../statements.ts';
import { storedTenants, type Lane, type LaneCursor } from './lanes.ts';

const UNIQUE_VIOLATION = '23505';

/** A message that must wait behind its key, or for its own retry; written to `held` with the acknowledgement. */
export interface HeldRow {
  partition: number;
  key: string;
  position: number | null;
  message: Envelope | null;
  attempts: number;
  next_attempt_at: string | null;
  history: AttemptRecord[];
}

/** A dead letter, as the acknowledgement (or a retry pass) writes it. */
export interface DeadRow {
  subscription: string;
  message_id: string;
  topic: string;
  key: string;
  position: number | null;
  envelope: Envelope;
  reason: string;
  attempts: AttemptRecord[];
}

/** A dead letter to write. Its data stays in the log when the message has a position there (see `statements.insertDeadLetters`). */
export function deadRow(subscription: string, envelope: Envelope, position: number | string | null, reason: string, attempts: AttemptRecord[]): DeadRow {
  const { data, ...attributes } = envelope;
  return {
    subscription,
    message_id: envelope.id,
    topic: envelope.topic,
    key: envelope.partitionkey,
    position: position === null ? null : Number(position),
    envelope: position === null ? envelope : (attributes as Envelope),
    reason,
    attempts,
  };
}

/** What one acknowledgement records: where its lanes move, and the batch's inbox ids, held rows and dead letters. */
export interface Acknowledgement {
  readonly lanes: readonly Lane[];
  readonly next: ReadonlyMap<number, LaneCursor>;
  /** Messages handled per partition (the cursors' `handled` counters). */
  readonly counts: ReadonlyMap<number, number>;
  readonly handledIds: readonly string[];
  readonly held: readonly HeldRow[];
  readonly dead: readonly DeadRow[];
}

/**
 * The acknowledgement as one statement (see `statements.ack`), fenced by the lanes' epochs and this worker's
 * topics. `duplicates`: what an inbox id already recorded does ('skip' inside the handlers' transaction,
 * 'fail' for one that commits alone: see `ackAlone`).
 */
export function ackStatement(sql: Statements, spec: SubscriptionSpec, owner: string, ack: Acknowledgement, duplicates: 'skip' | 'fail'): Statement {
  const { lanes, next, counts } = ack;
  return {
    name: `tidings.${sql.schema}.ack.${duplicates}`,
    text: sql.ack(duplicates),
    params: [
      spec.name,
      owner,
      lanes.map((lane) => lane.partition),
      lanes.map((lane) => lane.epoch),
      lanes.map((lane) => next.get(lane.partition)!.done),
      lanes.map((lane) => next.get(lane.partition)!.window),
      lanes.map((lane) => next.get(lane.partition)!.position),
      lanes.map((lane) => counts.get(lane.partition) ?? 0),
      ack.handledIds,
      JSON.stringify(ack.held),
      JSON.stringify(ack.dead),
      spec.topics,
      lanes.map((lane) => storedTenants(next.get(lane.partition)!)),
      lanes.map((lane) => next.get(lane.partition)!.doneLast),
      lanes.map((lane) => next.get(lane.partition)!.doneNextXid),
      lanes.map((lane) => next.get(lane.partition)!.hi),
      lanes.map((lane) => next.get(lane.partition)!.windowNextXid),
    ],
  };
}

/**
 * Sends an acknowledgement that commits alone, its inbox insert failing on an id already recorded (the cheaper
 * statement); if one was (another worker handled a copy since the read), sends it again skipping those ids.
 */
export async function ackAlone(driver: SqlDriver, ack: (duplicates: 'skip' | 'fail') => Statement): Promise<void> {
  try {
    await runStatement(preparing(driver), ack('fail'));
  } catch (error) {
    const { code, table } = error as { code?: unknown; table?: unknown };
    if (code !== UNIQUE_VIOLATION || (table !== undefined && table !== 'inbox')) throw error;
    await runStatement(preparing(driver), ack('skip'));
  }
}
