/**
 * How a redrive or a drop works through a selection of dead letters: in chunks, oldest first, each chunk one
 * transaction that also writes its audit rows, at a given pace, stoppable between chunks.
 */
import { hostname, userInfo } from 'node:os';
import type { DeadLetterActionResult, DeadLetterProgress } from '../../core/dead-letters.ts';
import { TidingsError } from '../../core/errors.ts';
import { sleep } from '../../core/sleep.ts';
import type { Queryable, SqlDriver } from '../connection/driver.ts';
import type { DeadLetterStatements } from '../sql/dead-letters.ts';
import { adminDefaults } from './options.ts';

export interface ChunkedActionOptions {
  readonly schema: string;
  /** Who does this, for the audit table: defaults to the OS user and host (`alice@ops-1`). */
  readonly actor?: string | undefined;
  readonly chunkSize?: number | undefined;
  readonly onProgress?: ((progress: DeadLetterProgress) => void) | undefined;
  /** Stops between chunks; what was done stays done (and audited). */
  readonly signal?: AbortSignal | undefined;
}

interface ChunkRow {
  id: string;
  subscription: string;
  message_id: string;
  key: string;
}

interface ChunkPlan {
  readonly action: 'redrive' | 'drop';
  readonly sql: DeadLetterStatements;
  /** The selection, from `selectionSql`, and its parameters. */
  readonly where: string;
  readonly params: readonly unknown[];
  readonly options: ChunkedActionOptions;
  readonly chunkSize: number;
  readonly ratePerSecond: number | undefined;
  /** In the chunk's transaction, before its dead letters are chosen. */
  readonly begin?: (tx: Queryable) => Promise<void>;
  /** In the chunk's transaction, before its dead letters are deleted. */
  readonly move?: (tx: Queryable, rows: ChunkRow[]) => Promise<void>;
  /** In the chunk's transaction, after the audit rows, with the subscriptions it touched. */
  readonly after?: (tx: Queryable, subscriptions: string[]) => Promise<void>;
}

/** The chunk size asked for, or the default; refused unless a positive integer. */
export function chunkOf(options: { readonly chunkSize?: number | undefined }): number {
  const size = options.chunkSize ?? adminDefaults.chunkSize;
  if (!(Number.isSafeInteger(size) && size >= 1)) throw new TidingsError('INVALID_OPTIONS', `chunkSize must be a positive integer, got ${size}`);
  return size;
}

/** Deletes the selected dead letters chunk by chunk (after `move`, for a redrive), auditing each chunk. */
export async function inChunks(driver: SqlDriver, plan: ChunkPlan): Promise<DeadLetterActionResult> {
  const { options, sql } = plan;
  const actor = options.actor ?? defaultActor();
  const bound = [...plan.params];
  // Only what exists now: a redriven message that fails again must not be redriven again by this run.
  const { rows: head } = await driver.query<{ max: string | null; total: string | number }>(sql.head(plan.where), bound);
  const total = Number(head[0]?.total ?? 0);
  const chunk = sql.chunk(plan.where, bound, head[0]?.max ?? '0', plan.chunkSize);
  const result = { matched: total, count: 0, bySubscription: {} as Record<string, number>, messageIds: [] as string[], stopped: false };
  options.onProgress?.({ done: 0, total });
  const started = Date.now();
  while (result.count < total) {
    if (options.signal?.aborted) {
      result.stopped = true;
      break;
    }
    const rows = await driver.transaction(async (tx) => {
      await plan.begin?.(tx);
      const { rows: chosen } = await tx.query<ChunkRow>(chunk, bound);
      if (chosen.length === 0) return chosen;
      await plan.move?.(tx, chosen);
      await tx.query(sql.delete, [chosen.map((row) => row.id)]);
      const bySubscription = groupBy(chosen, (row) => row.subscription);
      for (const [subscription, group] of bySubscription) {
        await tx.query(sql.audit, [plan.action, actor, subscription, group.map((row) => row.message_id), group.length]);
      }
      await plan.after?.(tx, [...bySubscription.keys()]);
      return chosen;
    });
    if (rows.length === 0) break; // another operator took the rest
    for (const row of rows) {
      result.bySubscription[row.subscription] = (result.bySubscription[row.subscription] ?? 0) + 1;
      result.messageIds.push(row.message_id);
    }
    result.count += rows.length;
    options.onProgress?.({ done: result.count, total });
    if (plan.ratePerSecond !== undefined && result.count < total) {
      await sleep(started + (result.count / plan.ratePerSecond) * 1000 - Date.now(), options.signal);
    }
  }
  return result;
}

/** `alice@ops-1`: the OS user and host, for the audit table when no actor is named. */
export function defaultActor(): string {
  let user = process.env.USER ?? process.env.USERNAME ?? 'unknown';
  try {
    user = userInfo().username;
  } catch {
    // No passwd entry (some containers): the environment's name will do.
  }
  return `${user}@${hostname()}`;
}

function groupBy<T>(items: readonly T[], keyOf: (item: T) => string): Map<string, T[]> {
  const groups = new Map<string, T[]>();
  for (const item of items) {
    const key = keyOf(item);
    const group = groups.get(key);
    if (group === undefined) groups.set(key, [item]);
    else group.push(item);
  }
  return groups;
}
