/**
 * Operating replicas from outside their process (the `tidings` CLI, a console): list them with their last
 * drift check, and ask one to check now. The check itself runs in the replica's own process, which talks
 * to the source over the bus; this side only sends the command and reads the recorded result.
 */
import { createBus } from '../core/bus.ts';
import type { AnyContract, InputOf } from '../core/contract.ts';
import { newId } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import type { Queryable } from '../postgres/connection/driver.ts';
import { postgres } from '../postgres/index.ts';
import { checkContract, rebuildContract } from './protocol.ts';
import { generationStatements, metaStatements, replicaBase } from './sql.ts';
import type { DriftReport, RebuildProgress, RebuildReport } from './define.ts';

export interface ReplicaStatus {
  readonly name: string;
  readonly source: string;
  readonly generation: number;
  /** The generation a rebuild is filling, or null. */
  readonly building: number | null;
  readonly rows: number;
  readonly checkedAt: string | null;
  readonly rebuiltAt: string | null;
  readonly lastCheck: DriftReport | null;
}

/** Every replica whose tables live in `schema`; none when there are no replicas there. */
export async function listReplicas(db: Queryable, options: { schema: string; replica?: string }): Promise<ReplicaStatus[]> {
  const meta = metaStatements(options.schema);
  const { rows: exists } = await db.query<{ t: string | null }>(meta.exists);
  if (exists[0]?.t == null) return [];
  const { rows } = await db.query<{
    name: string;
    source: string;
    generation: number;
    building: number | null;
    checked_at: Date | string | null;
    rebuilt_at: Date | string | null;
    last_check: DriftReport | null;
  }>(meta.list, [options.replica ?? null]);
  const result: ReplicaStatus[] = [];
  for (const row of rows) {
    const tables = generationStatements(options.schema, replicaBase(row.name), row.name, meta.meta);
    const count = await db.query<{ n: string }>(tables.liveCount(Number(row.generation))).catch(() => ({ rows: [{ n: '0' }] }));
    result.push({
      name: row.name,
      source: row.source,
      generation: Number(row.generation),
      building: row.building === null ? null : Number(row.building),
      rows: Number(count.rows[0]?.n ?? 0),
      checkedAt: row.checked_at === null ? null : new Date(row.checked_at).toISOString(),
      rebuiltAt: row.rebuilt_at === null ? null : new Date(row.rebuilt_at).toISOString(),
      lastCheck: row.last_check,
    });
  }
  return result;
}

/** A command to a replica, and how long to wait for its answer. */
interface ReplicaCommandOptions extends ReplicaTarget {
  readonly timeoutMs: number;
  readonly signal?: AbortSignal;
}

/**
 * Sends `tidings.replica.<replica>.check` over the bus and waits until the replica records the check's
 * report. Fails with SOURCE_UNAVAILABLE if no report comes within `timeoutMs` (the replica's process is
 * not running, or its source does not answer).
 */
export async function requestDriftCheck(options: ReplicaCommandOptions): Promise<DriftReport> {
  await requireReplica(options);
  const checkId = newId();
  await sendCommand(options, checkContract(options.replica), { checkId, requestedBy: 'tidings-cli' });
  const meta = metaStatements(options.schema);
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    const { rows } = await options.db.query<{ last_check: DriftReport | null }>(meta.checkRecorded, [options.replica, checkId]);
    if (rows[0]?.last_check != null) return rows[0].last_check;
    if (Date.now() > deadline || options.signal?.aborted) {
      throw new TidingsError(
        'SOURCE_UNAVAILABLE',
        `Replica ${options.replica} did not report check ${checkId} within ${Math.round(options.timeoutMs / 1000)} s. Is its service running (its subscription replica.${options.replica}.replies in tidings status)? The command stays in the log: the replica runs it when its process starts again.`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Where a command to a replica goes (a bus on `url`) and where its answer is read (`db`). */
interface ReplicaTarget {
  readonly url: string;
  readonly schema: string;
  readonly replica: string;
  readonly db: Queryable;
}

/** Fails with the names of the replicas that do exist when `replica` is not one of them. */
async function requireReplica(options: ReplicaTarget): Promise<void> {
  const known = await listReplicas(options.db, { schema: options.schema, replica: options.replica });
  if (known.length > 0) return;
  const all = await listReplicas(options.db, { schema: options.schema });
  throw new TidingsError(
    'INVALID_OPTIONS',
    `No replica ${JSON.stringify(options.replica)} in schema ${options.schema}${all.length > 0 ? `; there are: ${all.map((r) => r.name).join(', ')}` : ''} (tidings drift status lists them)`,
  );
}

/** Publishes one command to the replica's process from a short-lived bus of its own. */
async function sendCommand<C extends AnyContract>(options: ReplicaTarget, command: C, data: InputOf<C>): Promise<void> {
  const bus = createBus({
    service: 'tidings-cli',
    backbone: postgres({ url: options.url, schema: options.schema, migrate: false, retention: false, poolSize: 2, onWarning: () => undefined }),
  });
  try {
    await bus.send(command, data);
  } finally {
    await bus.stop();
  }
}

/**
 * Sends `tidings.replica.<replica>.rebuild` over the bus and follows the progress the replica records in
 * its meta row (`onProgress` on every change), until it reports the rebuild done or failed. Fails with
 * SOURCE_UNAVAILABLE if the replica reports nothing new for `timeoutMs` (its process is not running, or
 * its source does not answer), and with STOPPED when `signal` aborts (the rebuild goes on in the replica).
 */
export async function requestRebuild(options: ReplicaCommandOptions & { onProgress?: (progress: RebuildProgress) => void }): Promise<RebuildReport> {
  await requireReplica(options);
  const rebuildId = newId();
  await sendCommand(options, rebuildContract(options.replica), { rebuildId, requestedBy: 'tidings-cli' });
  const meta = metaStatements(options.schema);
  let heard = Date.now();
  let last = '';
  for (;;) {
    // A meta table from before rebuild progress has no column yet: the replica's migration adds it.
    const { rows } = await options.db
      .query<{ rebuild: { state: string; done: number; total: number | null; report?: RebuildReport; error?: string } | null }>(meta.rebuildRecorded, [
        options.replica,
        rebuildId,
      ])
      .catch(() => ({ rows: [] }));
    const record = rows[0]?.rebuild;
    if (record != null) {
      const seen = `${record.state}:${record.done}:${record.total}`;
      if (seen !== last) {
        last = seen;
        heard = Date.now();
        options.onProgress?.({ done: record.done, total: record.total });
      }
      if (record.state === 'done' && record.report !== undefined) return record.report;
      if (record.state === 'failed')
        throw new TidingsError(
          'SOURCE_UNAVAILABLE',
          `Replica ${options.replica}: rebuild ${rebuildId} failed: ${record.error ?? 'no reason given'}. Readers still see the previous generation, whole.`,
        );
    }
    if (options.signal?.aborted) {
      throw new TidingsError(
        'STOPPED',
        `Stopped following rebuild ${rebuildId} of ${options.replica}; the replica goes on with it (tidings drift status shows the generation being built).`,
      );
    }
    if (Date.now() - heard > options.timeoutMs) {
      throw new TidingsError(
        'SOURCE_UNAVAILABLE',
        `Replica ${options.replica} reported nothing on rebuild ${rebuildId} for ${Math.round(options.timeoutMs / 1000)} s. Is its service running (its subscription replica.${options.replica}.replies in tidings status), and its source's (replica-source.<source>)? The command stays in the log: the replica runs it when its process starts again.`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
