/** Following a topic's new messages from outside any subscription (`tidings tail`). */
import { sleep } from '../../core/sleep.ts';
import type { Envelope } from '../../core/envelope.ts';
import { toEnvelope, type LogRow } from '../codec.ts';
import type { Queryable } from '../connection/driver.ts';
import { tailStatements, type TailFilter } from '../sql/tail.ts';
import { adminDefaults } from './options.ts';
import { explainMissingSchema } from './schema.ts';

export interface TailOptions extends TailFilter {
  readonly schema: string;
  /** Begin at this log position (older messages included); from now when absent. */
  readonly fromPosition?: number | undefined;
  readonly pollMs?: number | undefined;
  /** Ends the iteration. */
  readonly signal?: AbortSignal | undefined;
}

export interface TailedMessage {
  readonly position: number;
  readonly envelope: Envelope;
}

/**
 * Follows a topic's new messages, in commit order, by polling. It reads with snapshots like a consumer
 * (not "position greater than the last one seen", which skips a transaction that committed after a
 * later-numbered one) and keeps no state in the database: it is safe to point at production.
 */
export async function* tailTopic(db: Queryable, options: TailOptions): AsyncGenerator<TailedMessage> {
  const sql = tailStatements(options.schema);
  const pollMs = options.pollMs ?? adminDefaults.tailPollMs;
  const snapshot = async () => (await db.query<{ snapshot: string }>(sql.snapshot)).rows[0]!.snapshot;
  let done: string;
  let window: string | null = null;
  let after = 0;
  if (options.fromPosition !== undefined) {
    done = '1:1:';
    window = await snapshot();
    after = options.fromPosition - 1;
  } else {
    done = await snapshot();
  }
  const params: unknown[] = [];
  const read = sql.read(options, params);
  const stopped = () => options.signal?.aborted === true;
  while (!stopped()) {
    window ??= await snapshot();
    const { rows } = await explainMissingSchema(options.schema, () => db.query<LogRow>(read, [...params, done, window, after, adminDefaults.tailBatch]));
    for (const row of rows) {
      if (stopped()) return;
      yield { position: Number(row.position), envelope: toEnvelope(row) };
    }
    if (rows.length === adminDefaults.tailBatch) {
      after = Number(rows[rows.length - 1]!.position);
      continue;
    }
    done = window;
    window = null;
    after = 0;
    await sleep(pollMs, options.signal);
  }
}
