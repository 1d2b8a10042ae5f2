/**
 * What the PostgreSQL backbone reports to the bus's telemetry (src/telemetry): its subscriptions' status for
 * the metrics' gauges, and its health checks for `bus.health()`. Both read what `tidings status` reads.
 */
import type { BackboneStatus, HealthCheck, SubscriptionState } from '../telemetry/status.ts';
import { readStatus, type SubscriptionStatus } from './ops/status.ts';
import type { Queryable } from './connection/driver.ts';

export async function postgresStatus(db: Queryable, schema: string): Promise<BackboneStatus> {
  const status = await readStatus(db, { schema });
  return { subscriptions: status.subscriptions.map(toState) };
}

function toState(subscription: SubscriptionStatus): SubscriptionState {
  return {
    name: subscription.name,
    lag: subscription.lag,
    oldestUnhandledAgeMs: subscription.oldestUnprocessedAgeMs,
    heldKeys: subscription.heldKeys,
    deadLetters: subscription.deadLetters,
    partitions: subscription.cursors.map((cursor) => ({ partition: cursor.partition, lag: cursor.lag, oldestUnhandledAgeMs: cursor.oldestUnprocessedAgeMs })),
  };
}

/**
 * The database answers a query, and the notifier listens (or, where LISTEN cannot deliver, consumers poll:
 * slower, but working, so it does not make the process unready).
 */
export async function postgresHealth(db: Queryable, description: string, listening: boolean | undefined): Promise<HealthCheck[]> {
  const checks: HealthCheck[] = [];
  try {
    await db.query('select 1');
    checks.push({ name: 'database', ok: true, detail: `reachable (${description})` });
  } catch (error) {
    checks.push({ name: 'database', ok: false, detail: `${description} is unreachable: ${(error as Error).message}` });
  }
  if (listening !== undefined) {
    checks.push({ name: 'notifier', ok: true, detail: listening ? 'listening' : 'polling (LISTEN is not delivering: reconnecting, or a pooling proxy)' });
  }
  return checks;
}
