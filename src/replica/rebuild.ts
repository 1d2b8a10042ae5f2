import { newId } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import type { RebuildProgress, RebuildReport } from './define.ts';
import type { Traffic } from './requests.ts';
import type { ReplicaParts } from './store.ts';

/** What a rebuild needs of its replica. */
interface Rebuild<Row> extends ReplicaParts<Row> {
  readonly pageSize: number;
}

/**
 * Fills a fresh generation from the source's state (pages over the bus) and switches readers to it in one
 * transaction; events arriving meanwhile are applied to both generations (the apply function writes the one
 * being built too), so none is lost at the switch. Readers see the old table, whole, until the switch.
 */
export async function rebuild<Row>(job: Rebuild<Row>, onProgress?: (progress: RebuildProgress) => void): Promise<RebuildReport> {
  const { store, name } = job;
  const started = Date.now();
  const traffic: Traffic = { sent: 0, received: 0 };
  const next = await job.transaction(async (tx) => {
    const meta = await store.readMeta(tx, true);
    // A rebuild that died half-way (its process stopped): start that table again.
    if (meta.building !== null) await store.dropGeneration(tx, meta.building);
    const generation = Math.max(meta.generation, meta.building ?? 0) + 1;
    await store.createGeneration(tx, generation);
    await tx.query(store.meta.startBuilding, [name, generation]);
    return generation;
  });
  store.forget();
  let done = 0;
  let total: number | null = null;
  let after: string | null = null;
  let afterTenant = '';
  try {
    for (;;) {
      const [parts] = await job.requests.ask(
        [{ kind: 'page', requestId: newId(), replica: name, after, ...(afterTenant === '' ? {} : { afterTenant }), limit: job.pageSize }],
        traffic,
      );
      const rows = parts!.flatMap((reply) => (reply.kind === 'page' ? reply.rows : []));
      if (after === null) total = parts![0]?.kind === 'page' ? parts![0].total : null;
      if (rows.length > 0) {
        // A batch of live events holding some of these keys can deadlock with the page: the page is
        // idempotent, so it is the one that tries again.
        await retryConflicts(() => store.driver.query(store.tables.insertPage(next), [JSON.stringify(rows)]));
        done += rows.length;
        after = rows[rows.length - 1]!.key;
        afterTenant = rows[rows.length - 1]!.tenant ?? '';
      }
      onProgress?.({ done, total });
      if (rows.length < job.pageSize) break;
    }
    await job.transaction(async (tx) => {
      const meta = await store.readMeta(tx, true);
      if (meta.building !== next)
        throw new TidingsError(
          'SUBSCRIPTION_CONFLICT',
          `Replica ${name}: another rebuild (generation ${meta.building}) took over this one (generation ${next}); let it finish`,
        );
      await tx.query(store.tables.point(next));
      await tx.query(store.meta.switchTo, [name, next]);
      // Handlers still writing the old table hold it until they commit; a handler that read the old
      // generation and writes after this commit fails, is retried, and reads the new one.
      await store.dropGeneration(tx, meta.generation);
    });
    store.forget();
  } catch (error) {
    store.forget();
    await store.driver.query(store.meta.stopBuilding, [name, next]).catch(() => undefined);
    await store.dropGeneration(store.driver, next).catch(() => undefined);
    throw error;
  }
  return {
    replica: name,
    generation: next,
    rows: done,
    durationMs: Date.now() - started,
    messages: traffic,
    ...(job.tenant === undefined ? {} : { tenant: job.tenant }),
  };
}

/** Runs `fn` again after a deadlock or serialization failure (up to 10 times): for idempotent writes only. */
async function retryConflicts<T>(fn: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (error) {
      const code = ((error as { cause?: { code?: unknown } }).cause ?? (error as { code?: unknown }))?.code;
      if (attempt >= 10 || (code !== '40P01' && code !== '40001')) throw error;
      await new Promise((resolve) => setTimeout(resolve, attempt * 20 * Math.random()));
    }
  }
}
