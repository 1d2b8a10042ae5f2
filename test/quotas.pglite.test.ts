/**
 * Quotas on embedded PostgreSQL (PGlite, one session): a publish inside `bus.transaction` takes its tokens in
 * that transaction (a statement beside it would wait for it: postgres/quotas.ts), standalone ones on their
 * own; both draw on the tenant's one bucket.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PGlite } from '@electric-sql/pglite';
import { createBus, TenantRateLimitedError } from '../src/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';

test('embedded: publishes in a transaction and standalone share the bucket; over it, TENANT_RATE_LIMITED', async (t) => {
  const db = await PGlite.create();
  const bus = createBus({
    service: 'embedded',
    backbone: postgres({ pglite: db, schema: 'quota_lite', onWarning: () => undefined, tenancy: { quotas: { default: { ratePerSecond: 0.001, burst: 4 } } } }),
  });
  t.after(async () => {
    await bus.stop();
    await db.close();
  });
  await bus.start();
  await bus.transaction(async (tx) => {
    await bus.publish(Ticked, { key: 'k', seq: 1 }, { tx, tenant: 'acme' });
    await bus.publish(Ticked, { key: 'k', seq: 2 }, { tx, tenant: 'acme' });
  });
  await bus.publish(Ticked, { key: 'k', seq: 3 }, { tenant: 'acme' });
  await bus.publish(Ticked, { key: 'k', seq: 4 }, { tenant: 'acme' });
  await assert.rejects(bus.publish(Ticked, { key: 'k', seq: 5 }, { tenant: 'acme' }), TenantRateLimitedError);
  await assert.rejects(
    bus.transaction((tx) => bus.publish(Ticked, { key: 'k', seq: 6 }, { tx, tenant: 'acme' })),
    TenantRateLimitedError,
  );
  const { rows } = await db.query<{ n: number }>(`select count(*)::int as n from quota_lite.log where tenant = 'acme'`);
  assert.equal(rows[0]!.n, 4, 'the four admitted, nothing refused');
});
