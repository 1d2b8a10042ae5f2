/**
 * Crashes, against a real PostgreSQL server: worker processes killed with -9 mid-batch while publishers
 * publish. Each test has its own schema; takeover times are printed as diagnostics.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { keyHash } from '../src/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { checkOrder, effects, keysPerPartition } from './fixtures/effects.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, createEffects, sleep, waitFor } from './helpers.ts';

/** Bounds every test: a hang fails it instead of the whole run. */
const bounded = { timeout: 60_000 };
/** The retention tests run retention themselves and count what it deletes: the backbone's own must not. */
const faultDefaults = { retention: false } as const;

test(
  "kill -9 of a worker mid-batch, 4 times, while publishers publish: one effect per message, in order per key; the survivor takes over the dead one's partitions",
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'kill', faultDefaults);
    if (world === undefined) return;
    const { schema } = world;
    await createEffects(schema);
    const db = await connect();
    const publisher = world.bus('publisher');
    await publisher.start();
    // 4 partitions (the worker's subscription), 4 keys in each; each key is published by one loop, in order.
    const keys = keysPerPartition(4, 4);
    const partitionOfKey = new Map(keys.map((key) => [key, keyHash(key) % 4]));
    const published = new Set<string>();
    let publishing = true;
    const loops = Array.from({ length: 4 }, async (_, p) => {
      const mine = keys.filter((_key, i) => i % 4 === p);
      for (let seq = 0; publishing; seq++) {
        for (const key of mine) published.add((await publisher.publish(Ticked, { key, seq })).id);
        await sleep(100); // about 150 messages a second in all: a steady stream, not a flood
      }
    });

    const workerEnv = { HANDLE_MS: '5', PROGRESS: '1' };
    const held = async (pid: number): Promise<number[]> =>
      (
        await db.query(
          `select partition from "${schema}".cursors where subscription = 'ordered' and owner like $1 and lease_expires_at > now() order by partition`,
          [`%:${pid}:%`],
        )
      ).rows.map((row: { partition: number }) => row.partition);
    let workers = [await startProcess('worker', { SCHEMA: schema, ...workerEnv }), await startProcess('worker', { SCHEMA: schema, ...workerEnv })];
    const takeovers: number[] = [];
    let midBatch = 0;
    try {
      for (let round = 0; round < 4; round++) {
        await waitFor(
          'two workers with two partitions each',
          async () => (await Promise.all(workers.map((w) => held(w.pid)))).every((p) => p.length === 2),
          20_000,
        );
        // Alternately the older and the newer worker.
        const [victim, survivor] = round % 2 === 0 ? [workers[0]!, workers[1]!] : [workers[1]!, workers[0]!];
        const victimPartitions = await held(victim.pid);
        const victimKeys = keys.filter((key) => victimPartitions.includes(partitionOfKey.get(key)!));
        const { rows: mark } = await db.query(`select coalesce(max(n), 0)::int8 as n from "${schema}".effects`);
        // Mid-batch: the victim has just written a message's effect in its batch's transaction and is
        // still handling (HANDLE_MS), so the batch is not acknowledged yet.
        const line = await victim.nextLine(/^handling /);
        victim.child.kill('SIGKILL');
        const killedAt = Date.now();
        assert.equal(await victim.exited, 'SIGKILL');
        await waitFor(
          "the survivor's first effect on the dead worker's partitions",
          async () =>
            (await db.query(`select 1 from "${schema}".effects where n > $1 and worker <> $2 and key = any($3) limit 1`, [mark[0].n, victim.pid, victimKeys]))
              .rows.length > 0,
          20_000,
        );
        const takeover = Date.now() - killedAt;
        takeovers.push(takeover);
        const [key, seq] = line.slice('handling '.length).split(':');
        const { rows: effect } = await db.query(`select worker from "${schema}".effects where key = $1 and seq = $2`, [key, Number(seq)]);
        // The message it was handling when it died: its write was rolled back with the unacknowledged batch.
        if (!effect.some((row: { worker: number }) => row.worker === victim.pid)) midBatch++;
        t.diagnostic(
          `kill ${round + 1}: worker ${victim.pid} killed while handling ${key}:${seq} (partitions ${victimPartitions.join(', ')}); worker ${survivor.pid} took over in ${takeover} ms`,
        );
        workers = [survivor, await startProcess('worker', { SCHEMA: schema, ...workerEnv })];
      }
      publishing = false;
      await Promise.all(loops);
      await waitFor(
        'an effect for every published message',
        async () => Number((await db.query(`select count(distinct message_id)::int as n from "${schema}".effects`)).rows[0].n) >= published.size,
        30_000,
      );
      // After a graceful stop nothing more can be written: the count is final.
      await Promise.all(workers.map((worker) => worker.stop()));
      const rows = await effects(db, schema);
      assert.equal(rows.length, published.size, 'exactly one effect per message (effects through ctx.tx commit with the ack)');
      assert.deepEqual(new Set(rows.map((row) => row.message_id)), published, 'every published message handled');
      assert.deepEqual(checkOrder(rows), [], 'per-key order kept across the kills');
      assert.ok(midBatch >= 1, `at least one kill landed mid-batch (${midBatch} of 4 did)`);
      const leaseMs = 2_000;
      for (const ms of takeovers) assert.ok(ms < leaseMs + 5_000, `takeover within the lease (2 s) and a few heartbeats: ${ms} ms`);
      t.diagnostic(
        `${published.size} messages; 4 kills (${midBatch} verified mid-batch); takeover after kill -9 (leaseMs 2000, heartbeatMs 500): ${takeovers.join(', ')} ms, max ${Math.max(...takeovers)} ms`,
      );
    } finally {
      publishing = false;
      for (const worker of workers) worker.child.kill('SIGKILL');
      await Promise.all(workers.map((worker) => worker.exited));
      await db.end();
    }
  },
);

// ---- connections cut -----------------------------------------------------------------------------
