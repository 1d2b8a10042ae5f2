/**
 * Fair shares of a batch's handler slots between tenants (subscription options `tenantConcurrency`,
 * `tenantWeights`; docs/tenancy.md). A batch's keys are handled `limit` at a time; without fairness they
 * start in the order their first message was read, so a tenant whose keys fill the front of a batch takes
 * every slot until they finish. Here each free slot goes to the tenant that has started the fewest keys
 * for its weight (weighted round robin), never to one that already has `perTenant x weight` keys in flight
 * while another waits. A key is one item: its messages stay in order, one at a time.
 */
import { shareCap, shareWeight, type TenantShares } from '../../core/backbone.ts';

/** Runs `fn` on every item, `limit` at once, sharing the slots fairly between the items' tenants. Throws the first error, after all ran. */
async function forEachFair<T>(
  items: readonly T[],
  limit: number,
  tenantOf: (item: T) => string,
  shares: TenantShares,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  const queues = new Map<string, { items: T[]; next: number; started: number; running: number; weight: number }>();
  for (const item of items) {
    const tenant = tenantOf(item);
    let queue = queues.get(tenant);
    if (queue === undefined) queues.set(tenant, (queue = { items: [], next: 0, started: 0, running: 0, weight: shareWeight(shares, tenant) }));
    queue.items.push(item);
  }
  const errors: unknown[] = [];
  let waiting: (() => void) | undefined;
  let left = items.length;

  /** The next item by weighted round robin among tenants under their cap, or undefined if all are at it. */
  const pick = (): { item: T; queue: { running: number } } | undefined => {
    let best: (typeof queues extends Map<string, infer Q> ? Q : never) | undefined;
    for (const queue of queues.values()) {
      if (queue.next >= queue.items.length) continue;
      if (queue.running >= shareCap(shares, queue.weight)) continue;
      if (best === undefined || queue.started / queue.weight < best.started / best.weight) best = queue;
    }
    if (best === undefined) return undefined;
    best.started++;
    best.running++;
    return { item: best.items[best.next++]!, queue: best };
  };

  const slot = async (): Promise<void> => {
    while (left > 0) {
      const picked = pick();
      if (picked === undefined) {
        // Every tenant with work left is at its cap: wait for a key to finish.
        await new Promise<void>((resolve) => {
          const previous = waiting;
          waiting = () => {
            previous?.();
            resolve();
          };
        });
        continue;
      }
      left--;
      try {
        await fn(picked.item);
      } catch (error) {
        errors.push(error);
      } finally {
        picked.queue.running--;
        const wake = waiting;
        waiting = undefined;
        wake?.();
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, slot));
  if (errors.length > 0) throw errors[0];
}

/** Runs `fn` on every item, `limit` at once: fairly between the items' tenants with `shares` (forEachFair), else in order. */
export function forEachSlot<T>(
  items: readonly T[],
  limit: number,
  tenantOf: (item: T) => string,
  shares: TenantShares | undefined,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  return shares === undefined ? forEachLimit(items, limit, fn) : forEachFair(items, limit, tenantOf, shares, fn);
}

/** Runs `fn` on every item, `limit` at once, in order. Throws the first error, after all ran. */
async function forEachLimit<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const errors: unknown[] = [];
  const lane = async () => {
    while (next < items.length) {
      const item = items[next++]!;
      try {
        await fn(item);
      } catch (error) {
        errors.push(error);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
  if (errors.length > 0) throw errors[0];
}
