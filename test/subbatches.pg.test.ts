/**
 * Batches split by partition (PostgreSQL, `handlerConnections`): when handlers write through `ctx.tx`, a
 * batch runs as several transactions on several connections, each acknowledging only its own partitions.
 * What that must not break: a failing writer replays only its own sub-batch; a lease lost on one partition
 * rolls back only that partition's work, and the partitions whose sub-batch committed are not handled again.
 * The inbox is off here, so a message read twice would be handled (and counted) twice.
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import type { Bus, HandlerContext, Message } from '../src/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, sql, waitFor } from './helpers.ts';
import { pgWorld } from './fixtures/bus.ts';

const PARTITIONS = 4;
const KEYS = 40;
const PER_KEY = 5;

interface Setup {
  readonly schema: string;
  readonly bus: Bus<PgTransaction>;
  /** Handlings per message id (more than 1: handled again). */
  readonly calls: Map<string, number>;
  /** Each key's seqs in the order handled, repeats included. */
  readonly order: Map<string, number[]>;
  /** What every handler here does first: counts the call, notes the order, writes the effect through ctx.tx. */
  record(message: Message<{ key: string; seq: number }>, ctx: HandlerContext<PgTransaction>): Promise<void>;
}

async function setup(t: TestContext): Promise<Setup | undefined> {
  const world = await pgWorld(t, 'sb');
  if (world === undefined) return undefined;
  const { schema } = world;
  const client = await connect();
  try {
    await client.query(`create schema if not exists "${schema}"`);
    // No unique key: an effect committed twice shows as two rows.
    await client.query(`create table "${schema}".effects (id text not null, key text not null, seq int not null, pid int not null)`);
  } finally {
    await client.end();
  }
  const calls = new Map<string, number>();
  const order = new Map<string, number[]>();
  return {
    schema,
    bus: world.bus('sub-batches', { handlerConnections: 4 }),
    calls,
    order,
    async record(message, ctx) {
      calls.set(message.id, (calls.get(message.id) ?? 0) + 1);
      order.set(message.data.key, [...(order.get(message.data.key) ?? []), message.data.seq]);
      await ctx.tx.query(`insert into "${schema}".effects (id, key, seq, pid) values ($1, $2, $3, pg_backend_pid())`, [
        message.id,
        message.data.key,
        message.data.seq,
      ]);
    },
  };
}

async function effects(schema: string): Promise<Array<{ id: string; key: string; seq: number; pid: number; n: number }>> {
  const rows = await sql<{ id: string; key: string; seq: number; pid: number; n: string }>(
    `select id, key, min(seq) as seq, min(pid) as pid, count(*) as n from "${schema}".effects group by id, key`,
  );
  return rows.map((row) => ({ ...row, n: Number(row.n) }));
}

async function partitionOf(schema: string, key: string): Promise<number> {
  const rows = await sql<{ p: number }>(`select key_hash % ${PARTITIONS} as p from "${schema}".log where key = $1 limit 1`, [key]);
  return Number(rows[0]!.p);
}

/** Publishes a warm-up message (its handler writes, so the next batch is split), then `perKey` ticks of every key in one transaction. */
async function publishAll(bus: Bus<PgTransaction>, seen: () => number, perKey: number): Promise<number> {
  await bus.publish(Ticked, { key: 'warm-up', seq: 0 });
  await waitFor('the warm-up', () => seen() >= 1);
  await bus.transaction(async (tx) => {
    const ticks = [];
    for (let seq = 1; seq <= perKey; seq++) for (let k = 0; k < KEYS; k++) ticks.push({ key: `k${k}`, seq });
    await bus.publishMany(Ticked, ticks, { tx });
  });
  return 1 + KEYS * perKey;
}

function assertOncePerMessageInOrder(rows: Awaited<ReturnType<typeof effects>>, total: number, order: Map<string, number[]>): void {
  assert.equal(rows.length, total, 'every message has its effect');
  assert.deepEqual(
    rows.filter((row) => row.n !== 1).map((row) => `${row.key}#${row.seq} x${row.n}`),
    [],
    'no effect committed twice',
  );
  for (const [key, seqs] of order) {
    const firsts = seqs.filter((seq, i) => seqs.indexOf(seq) === i);
    assert.deepEqual(
      firsts,
      [...firsts].sort((a, b) => a - b),
      `key ${key} handled in order`,
    );
  }
}

test('a writing batch runs on several connections at once; a writer that fails replays only its own sub-batch', async (t) => {
  const ready = await setup(t);
  if (ready === undefined) return;
  const { schema, bus, calls, order, record } = ready;
  let failed = false;
  bus.subscribe(
    'split',
    Ticked,
    async (message, ctx) => {
      await record(message, ctx);
      if (message.data.key === 'k7' && message.data.seq === 3 && !failed) {
        failed = true;
        throw new Error('fails once, after writing');
      }
    },
    { partitions: PARTITIONS, concurrency: 8, batchSize: 500, inbox: false, retry: { immediate: 2, delayed: [] } },
  );
  await bus.start();
  const total = await publishAll(bus, () => calls.size, PER_KEY);
  await waitFor('every message handled', () => calls.size === total);
  await waitFor('every effect committed', async () => (await effects(schema)).length === total);
  const rows = await effects(schema);
  assertOncePerMessageInOrder(rows, total, order);
  assert.ok(new Set(rows.filter((row) => row.key !== 'warm-up').map((row) => row.pid)).size > 1, 'the batch used more than one connection');

  // Only the failing key's sub-batch was replayed: messages of the other partitions ran once.
  const failing = await partitionOf(schema, 'k7');
  const partitions = new Map<string, number>();
  for (let k = 0; k < KEYS; k++) partitions.set(`k${k}`, await partitionOf(schema, `k${k}`));
  const byId = new Map(rows.map((row) => [row.id, row.key]));
  const again = [...calls].filter(([id, n]) => n > 1 && partitions.get(byId.get(id)!) !== failing);
  assert.deepEqual(again, [], 'no message outside the failing sub-batch ran twice');
  assert.ok(
    [...calls].some(([id, n]) => n > 1 && byId.get(id) === 'k7'),
    'the failing sub-batch was replayed',
  );
});

test('a lease lost on one partition mid-batch: its sub-batch is fenced and rolled back, the others commit once, and the partition is handled again after it is taken back', async (t) => {
  const ready = await setup(t);
  if (ready === undefined) return;
  const { schema, bus, calls, order, record } = ready;
  let unblock!: () => void;
  const blocked = new Promise<void>((resolve) => {
    unblock = resolve;
  });
  let blocking = false;
  bus.subscribe(
    'lease',
    Ticked,
    async (message, ctx) => {
      await record(message, ctx);
      if (message.data.key === 'k0' && message.data.seq === 2 && !blocking) {
        blocking = true;
        await blocked;
      }
    },
    { partitions: PARTITIONS, concurrency: 8, batchSize: 500, inbox: false, timeoutMs: 0 },
  );
  await bus.start();
  // 200 messages: enough for a sub-batch per partition (see MIN_SUB_BATCH).
  const total = await publishAll(bus, () => calls.size, PER_KEY);
  await waitFor('the k0 handler to block', () => blocking);
  const lost = await partitionOf(schema, 'k0');
  const keysOf = new Map<number, number>();
  for (let k = 0; k < KEYS; k++) {
    const p = await partitionOf(schema, `k${k}`);
    keysOf.set(p, (keysOf.get(p) ?? 0) + 1);
  }
  const others = (KEYS - (keysOf.get(lost) ?? 0)) * PER_KEY + ((await partitionOf(schema, 'warm-up')) === lost ? 0 : 1);
  const client = await connect();
  try {
    const handledElsewhere = async () => {
      const { rows } = await client.query<{ n: string }>(
        `select coalesce(sum(handled), 0) as n from "${schema}".cursors where subscription = 'lease' and partition <> $1`,
        [lost],
      );
      return Number(rows[0]!.n);
    };
    // The other sub-batches do not wait for the blocked one: their partitions are acknowledged meanwhile.
    await waitFor('the other partitions acknowledged', async () => (await handledElsewhere()) >= others);
    // Another worker takes the partition over (and lets its lease lapse at once, so ours can take it back).
    await client.query(
      `update "${schema}".cursors set owner = 'someone-else', epoch = epoch + 1, lease_expires_at = now() - interval '1 second' where subscription = 'lease' and partition = $1`,
      [lost],
    );
  } finally {
    await client.end();
  }
  unblock();
  await waitFor('every effect committed', async () => (await effects(schema)).length === total, 30_000);
  const rows = await effects(schema);
  assertOncePerMessageInOrder(rows, total, order);
  const byId = new Map(rows.map((row) => [row.id, row.key]));
  const partitions = new Map<string, number>();
  for (let k = 0; k < KEYS; k++) partitions.set(`k${k}`, await partitionOf(schema, `k${k}`));
  const inLost = [...calls].filter(([id]) => partitions.get(byId.get(id)!) === lost);
  assert.ok(
    inLost.some(([, n]) => n > 1),
    'the fenced partition was handled again after it was taken back',
  );
  assert.deepEqual(
    [...calls].filter(([id, n]) => n > 1 && byId.get(id) !== 'warm-up' && partitions.get(byId.get(id)!) !== lost),
    [],
    'no message of another partition ran twice',
  );
});
