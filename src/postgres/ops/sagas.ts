/**
 * Operating sagas from outside their process (the CLI's `tidings sagas`, a console): list instances, and show
 * one whole: its state and version, every transition with the message that caused it, its pending timeouts.
 */
import { iso } from '../codec.ts';
import type { Queryable } from '../connection/driver.ts';
import { sagaStatements } from '../sql/sagas.ts';
import { explainMissingSchema } from './schema.ts';

export interface SagaSummary {
  readonly saga: string;
  readonly id: string;
  readonly version: number;
  readonly completed: boolean;
  readonly startedAt: string;
  readonly updatedAt: string;
}

export interface SagaTransition {
  readonly version: number;
  readonly messageId: string;
  readonly topic: string;
  readonly at: string;
}

export interface SagaDetail extends SagaSummary {
  readonly state: unknown;
  readonly transitions: SagaTransition[];
  /** Timeouts asked for and not yet fired: when each is due, and its name. */
  readonly pendingTimeouts: Array<{ readonly name: string; readonly dueAt: string; readonly messageId: string }>;
}

export interface ListSagasOptions {
  readonly schema: string;
  readonly saga?: string | undefined;
  /** Only running instances, or only completed ones. */
  readonly status?: 'active' | 'completed' | undefined;
  readonly limit?: number | undefined;
}

/** Instances, the most recently changed first. */
export async function listSagas(db: Queryable, options: ListSagasOptions): Promise<{ total: number; sagas: SagaSummary[] }> {
  const sql = sagaStatements(options.schema);
  const params = [options.saga ?? null, options.status ?? null];
  return explainMissingSchema(options.schema, async () => {
    const [{ rows }, count] = await Promise.all([
      db.query<{ saga: string; id: string; version: number; completed: boolean; started_at: Date | string; updated_at: Date | string }>(sql.list, [
        ...params,
        options.limit ?? 50,
      ]),
      db.query<{ n: number }>(sql.count, params),
    ]);
    return { total: Number(count.rows[0]?.n ?? 0), sagas: rows.map((row) => summary(row)) };
  });
}

/** One instance whole, or undefined if it never started (or was removed). */
export async function showSaga(db: Queryable, options: { schema: string; saga: string; id: string }): Promise<SagaDetail | undefined> {
  const sql = sagaStatements(options.schema);
  return explainMissingSchema(options.schema, async () => {
    const { rows } = await db.query<{
      saga: string;
      id: string;
      version: number;
      completed: boolean;
      started_at: Date | string;
      updated_at: Date | string;
      state: unknown;
    }>(sql.show, [options.saga, options.id]);
    const row = rows[0];
    if (row === undefined) return undefined;
    const [transitions, timeouts] = await Promise.all([
      db.query<{ version: number; message_id: string; topic: string; at: Date | string }>(sql.transitions, [options.saga, options.id]),
      db.query<{ name: string; due_at: Date | string; id: string }>(sql.pendingTimeouts, [`tidings.saga.${options.saga}.timeout`, options.id]),
    ]);
    return {
      ...summary(row),
      state: row.state,
      transitions: transitions.rows.map((t) => ({ version: Number(t.version), messageId: t.message_id, topic: t.topic, at: iso(t.at) })),
      pendingTimeouts: timeouts.rows.map((t) => ({ name: t.name, dueAt: iso(t.due_at), messageId: t.id })),
    };
  });
}

function summary(row: { saga: string; id: string; version: number; completed: boolean; started_at: Date | string; updated_at: Date | string }): SagaSummary {
  return { saga: row.saga, id: row.id, version: Number(row.version), completed: row.completed, startedAt: iso(row.started_at), updatedAt: iso(row.updated_at) };
}
