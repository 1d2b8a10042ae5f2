/**
 * Tenant isolation enforced by PostgreSQL (src/postgres/tenants.ts, migration 013): handler code's SQL
 * through `ctx.tx` tries to reach another tenant's rows every way it can (raw selects and updates, SET ROLE,
 * RESET, set_config, a proof replayed from another transaction, the key itself) and reaches nothing.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Bus, Message } from '../src/index.ts';
import type { PgTransaction } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { connect, sleep, waitFor } from './helpers.ts';

const rls = { tenancy: { isolation: 'rls' as const } };

/** Runs `sql` in a savepoint of the handler's transaction: its error (if any) is caught and undone, as a careful handler would. */
/** One message of acme and one of globex in one transaction, so one batch: both handlers share the consumer's batch transaction. */
async function publishAcmeAndGlobex(bus: Bus<PgTransaction>): Promise<void> {
  await bus.transaction(async (tx) => {
    await bus.publish(Ticked, { key: 'a', seq: 1 }, { tx, tenant: 'acme' });
    await bus.publish(Ticked, { key: 'g', seq: 1 }, { tx, tenant: 'globex' });
  });
}

async function attempt(tx: PgTransaction, sql: string, params: unknown[] = []): Promise<{ rows: Record<string, unknown>[]; rowCount: number; error?: string }> {
  await tx.query('savepoint probe');
  try {
    const result = await tx.query<Record<string, unknown>>(sql, params);
    await tx.query('release savepoint probe');
    return { rows: result.rows, rowCount: result.rowCount ?? result.rows.length };
  } catch (error) {
    await tx.query('rollback to savepoint probe');
    return { rows: [], rowCount: 0, error: (error as Error).message };
  }
}

test("isolation: a tenant's handler SQL through ctx.tx reads and writes its tenant's rows only, whatever it tries", async (t) => {
  const world = await pgWorld(t, 'rls', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const findings = new Map<string, Record<string, unknown>>();
  let captured: { scope: string; proof: string } | undefined;
  bus.subscribe(
    'probe',
    Ticked,
    async (message: Message<{ key: string; seq: number; note?: string }>, ctx) => {
      const tx = ctx.tx;
      const own = message.tenant ?? '(none)';
      const tenantsSeen = async () =>
        (await attempt(tx, `select distinct coalesce(tenant, '(none)') as tenant from ${s}.log order by 1`)).rows.map((row) => row.tenant);
      const found: Record<string, unknown> = {
        seen: await tenantsSeen(),
        updatedOthers: (await attempt(tx, `update ${s}.log set data = '{"key":"x","seq":0}' where tenant is distinct from $1`, [message.tenant ?? null]))
          .rowCount,
        deletedOthers: (await attempt(tx, `delete from ${s}.log where tenant is distinct from $1`, [message.tenant ?? null])).rowCount,
        insertForOther: (
          await attempt(
            tx,
            `insert into ${s}.log (topic, id, type, source, time, key, key_hash, tenant, correlation_id, data) values ('test.ticked', gen_random_uuid()::text, 'test.ticked.v1', 'x', now(), 'k', 1, 'globex-2', 'c', '{}')`,
          )
        ).error,
        consumerTables: await Promise.all(
          ['cursors', 'held', 'inbox', 'dead_letters', 'subscriptions', 'workers'].map(
            async (table) => (await attempt(tx, `select * from ${s}.${table}`)).rowCount,
          ),
        ),
        key: (await attempt(tx, `select secret from ${s}.tenancy_key`)).error,
        unlist: (await attempt(tx, `delete from ${s}.tenancy_roles`)).error,
        disable: (await attempt(tx, `alter table ${s}.log disable row level security`)).error,
        enterWithoutTicket: (await attempt(tx, `select ${s}.tenancy_enter('all', $1)`, [captured?.proof ?? 'x'])).error,
        advanceCounter: (await attempt(tx, `select nextval('${s}.tenancy_entries')`)).error,
        readCounter: (await attempt(tx, `select currval('${s}.tenancy_entries')`)).error,
        setRole: (await attempt(tx, 'set role postgres')).error,
        sessionAuthorization: (await attempt(tx, 'set session authorization postgres')).error,
      };
      // The proof of its own scope, visible to its own SQL: kept to replay in a later transaction.
      const [proofRow] = (await attempt(tx, `select current_setting('tidings.scope') as scope, current_setting('tidings.proof') as proof`)).rows;
      if (message.data.note === 'capture') captured = { scope: String(proofRow!.scope), proof: String(proofRow!.proof) };
      // Each of these leaves the rest of the attempt worse off, so each runs in a savepoint undone after.
      const tryEscape = async (how: string, params: unknown[] = []) => {
        await tx.query('savepoint escape');
        try {
          await tx.query(how, params);
          return await tenantsSeen();
        } catch (error) {
          return (error as Error).message;
        } finally {
          await tx.query('rollback to savepoint escape');
        }
      };
      found.resetRole = await tryEscape('reset role');
      found.resetAll = await tryEscape('reset all');
      found.resetScope = await tryEscape('reset tidings.scope');
      found.forgedScope = await tryEscape(`select set_config('tidings.scope', 'all', true)`);
      found.forgedTenant = await tryEscape(`select set_config('tidings.scope', $1, true)`, [own === 'acme' ? 't:globex' : 't:acme']);
      if (message.data.note === 'replay' && captured !== undefined) {
        found.replayed = await tryEscape(`select set_config('tidings.scope', $1, true), set_config('tidings.proof', $2, true)`, [
          captured.scope,
          captured.proof,
        ]);
      }
      // Rolling back to the attempt's own savepoint brings back the scope set before it: its tenant's, never the consumer's.
      await tx.query('rollback to savepoint tidings_attempt');
      found.rollbackToConsumer = await tenantsSeen();
      found.own = own;
      findings.set(`${own}:${message.data.seq}`, found);
    },
    { partitions: 1, batchSize: 1 },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1, note: 'capture' }, { tenant: 'acme' });
  await waitFor('the first', () => findings.size >= 1);
  await bus.publish(Ticked, { key: 'g', seq: 2, note: 'replay' }, { tenant: 'globex' });
  await bus.publish(Ticked, { key: 'n', seq: 3 });
  await bus.publish(Ticked, { key: 'a', seq: 4 }, { tenant: 'acme' });
  await waitFor('every probe', () => findings.size >= 4);

  for (const [which, found] of findings) {
    const own = found.own;
    assert.deepEqual(found.seen, [own], `${which}: sees its own tenant's messages only`);
    assert.equal(found.updatedOthers, 0, `${which}: updates none of the others'`);
    assert.equal(found.deletedOthers, 0, `${which}: deletes none of the others'`);
    assert.match(String(found.insertForOther), /row-level security/, `${which}: cannot write a message for another tenant`);
    assert.deepEqual(found.consumerTables, [0, 0, 0, 0, 0, 0], `${which}: sees nothing of the consumer's tables`);
    assert.match(String(found.key), /permission denied/, `${which}: cannot read the key`);
    assert.match(String(found.unlist), /permission denied/, `${which}: cannot unlist its role`);
    assert.match(String(found.disable), /must be owner/, `${which}: cannot disable row-level security`);
    assert.match(String(found.enterWithoutTicket), /ticket does not prove/, `${which}: cannot enter a scope without the consumer's ticket`);
    assert.match(String(found.advanceCounter), /permission denied/, `${which}: cannot advance the entry counter`);
    assert.match(String(found.readCounter), /permission denied/, `${which}: cannot read the entry counter`);
    assert.match(String(found.setRole), /permission denied|does not exist/, `${which}: cannot SET ROLE`);
    assert.match(String(found.sessionAuthorization), /permission denied/, `${which}: cannot SET SESSION AUTHORIZATION`);
    assert.deepEqual(found.resetRole, [own], `${which}: RESET ROLE changes nothing`);
    for (const field of ['resetAll', 'resetScope', 'forgedScope', 'forgedTenant']) {
      assert.deepEqual(found[field], [], `${which}: ${field} leaves it seeing nothing at all`);
    }
    assert.deepEqual(found.rollbackToConsumer, [own], `${which}: ROLLBACK TO its attempt's savepoint keeps its tenant's scope`);
    if (found.replayed !== undefined) assert.deepEqual(found.replayed, [], `${which}: a proof replayed from another transaction is worth nothing`);
  }
  assert.ok(findings.get('globex:2')?.replayed !== undefined, 'the replay was tried');

  // Nothing the handlers tried changed a row of the log.
  const client = await connect();
  try {
    const { rows } = await client.query(`select tenant, data->>'seq' as seq from ${s}.log order by position`);
    assert.deepEqual(
      rows.map((row) => `${row.tenant}:${row.seq}`),
      ['acme:1', 'globex:2', 'null:3', 'acme:4'],
    );
  } finally {
    await client.end();
  }
});

test("isolation: handlers of several tenants writing through ctx.tx, some failing, retried in the batch and from held: every write once, each in its tenant's scope", async (t) => {
  const world = await pgWorld(t, 'rlsw', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const client = await connect();
  t.after(() => client.end());
  const tenants = ['acme', 'globex', 'initech'];
  /** Per message: its last attempt's number (a batch handled again after its first pass failed counts from 1 again). */
  const attempts = new Map<string, number>();
  bus.subscribe(
    'writer',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      const id = message.id;
      const { attempt } = ctx;
      attempts.set(id, attempt);
      const { rows } = await ctx.tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`);
      const { key, seq } = message.data;
      await ctx.tx.query(`insert into ${s}.effects (id, tenant, key, seq, scope, seen) values ($1, $2, $3, $4, current_setting('tidings.scope', true), $5)`, [
        id,
        message.tenant,
        key,
        seq,
        rows.map((row) => row.tenant),
      ]);
      // Every fifth fails twice (in the batch, then again: it waits in held), every third once (retried in the batch).
      if ((seq % 5 === 0 && attempt <= 2) || (seq % 3 === 0 && attempt === 1)) throw new Error(`fails at attempt ${attempt}`);
    },
    { partitions: 2, batchSize: 40, concurrency: 4, retry: { immediate: 1, delayed: [50], jitter: 0 } },
  );
  await bus.start();
  // `n`: the order writes were made in; only those kept are left to read.
  await client.query(
    `create table ${s}.effects (n bigserial, id text not null, tenant text not null, key text not null, seq int not null, scope text, seen text[] not null)`,
  );
  await client.query(`grant select, insert on ${s}.effects to tidings_tenant`);
  await client.query(`grant usage on sequence ${s}.effects_n_seq to tidings_tenant`);
  for (const tenant of tenants) {
    const ticks = Array.from({ length: 40 }, (_, i) => ({ key: `${tenant}-${i % 8}`, seq: Math.floor(i / 8) + 1 }));
    await bus.publishMany(Ticked, ticks, { tenant });
  }
  const kept = async () => (await client.query<{ n: number }>(`select count(*)::int as n from ${s}.effects`)).rows[0]!.n;
  await waitFor('every message handled', async () => (await kept()) >= 120);
  await sleep(200);

  const { rows } = await client.query<{ id: string; tenant: string; key: string; seq: number; scope: string | null; seen: string[] }>(
    `select * from ${s}.effects order by n`,
  );
  assert.equal(rows.length, 120, 'one write kept per message: those of failed attempts were rolled back');
  assert.equal(new Set(rows.map((row) => row.id)).size, 120, 'no message written twice');
  for (const row of rows) {
    assert.equal(row.scope, `t:${row.tenant}`, `${row.id}: written in its tenant's scope`);
    assert.deepEqual(row.seen, [row.tenant], `${row.id}: saw its own tenant's messages only`);
  }
  /** Per key: the seqs whose writes were kept, in the order they were made. */
  const order = new Map<string, number[]>();
  for (const row of rows) order.set(row.key, [...(order.get(row.key) ?? []), row.seq]);
  assert.equal(order.size, 24);
  for (const [key, seqs] of order) assert.deepEqual(seqs, [1, 2, 3, 4, 5], `${key}: handled once each, in order`);
  assert.ok(
    [...attempts.values()].some((n) => n === 3),
    'some messages were retried from held',
  );
});

test("isolation: a savepoint one tenant's handler leaves behind does not give a later handler of another tenant its scope", async (t) => {
  const world = await pgWorld(t, 'rlsp', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const seen = new Map<string, { xid: string; before?: string[]; replayed?: string[]; rollback?: string; after?: string[] | string }>();
  /** acme's scope and proof, kept by handler code for a later handler of the same transaction. */
  let kept: unknown[] = [];
  const tenantsSeen = async (tx: PgTransaction) =>
    (await tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`)).rows.map((row) => row.tenant);
  bus.subscribe(
    'planter',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      const [{ xid }] = (await ctx.tx.query<{ xid: string }>('select pg_current_xact_id()::text as xid')).rows as [{ xid: string }];
      if (message.tenant === 'acme') {
        // (In the first pass there is no such savepoint: the release fails, and the batch is handled again carefully.)
        // Out of its attempt's savepoint, a savepoint of its own, and the attempt's again so nothing fails.
        await ctx.tx.query('release savepoint tidings_attempt');
        await ctx.tx.query('savepoint planted');
        await ctx.tx.query('savepoint tidings_attempt');
        kept = Object.values((await ctx.tx.query(`select current_setting('tidings.scope') as scope, current_setting('tidings.proof') as proof`)).rows[0]!);
        seen.set('acme', { xid, before: await tenantsSeen(ctx.tx) });
        return;
      }
      const before = await tenantsSeen(ctx.tx);
      // acme's proof, set again in the same transaction: bound to an older entry, it proves nothing.
      await ctx.tx.query('savepoint replay');
      await ctx.tx.query(`select set_config('tidings.scope', $1, true), set_config('tidings.proof', $2, true)`, kept);
      const replayed = await tenantsSeen(ctx.tx);
      await ctx.tx.query('rollback to savepoint replay');
      let rollback = 'done';
      let after: string[] | string;
      try {
        // Back to acme's savepoint: its scope and proof as they were then, in the same transaction.
        await ctx.tx.query('rollback to savepoint planted');
        after = await tenantsSeen(ctx.tx);
      } catch (error) {
        rollback = (error as Error).message;
        after = rollback;
      }
      seen.set('globex', { xid, before, replayed, rollback, after });
    },
    { partitions: 1, batchSize: 10, concurrency: 1, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishAcmeAndGlobex(bus);
  await waitFor('both handled', () => seen.size >= 2);
  const acme = seen.get('acme')!;
  const globex = seen.get('globex')!;
  assert.equal(globex.xid, acme.xid, 'both handlers ran in one batch transaction');
  assert.deepEqual(acme.before, ['acme'], 'acme sees its own rows');
  assert.deepEqual(globex.before, ['globex'], 'globex sees its own rows before the rollback');
  assert.deepEqual(globex.replayed, [], "acme's proof replayed by a later handler in the same transaction is worth nothing");
  assert.equal(globex.rollback, 'done', 'the rollback to the planted savepoint ran');
  assert.deepEqual(globex.after, [], "the scope the rollback brought back is bound to an older entry: nothing is visible, not acme's rows");
});

test("isolation: a handler failing in the first pass (no savepoints) hands the whole batch again, with savepoints, where consecutive attempts of one tenant share its scope: every write once, each in its tenant's scope", async (t) => {
  const world = await pgWorld(t, 'rlsb', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const client = await connect();
  t.after(() => client.end());
  const tries = new Map<string, number>();
  /** The attempts that got through, in the order they ran: their transaction, tenant and proof. */
  const ran: Array<{ id: string; tenant: string; xid: string; proof: string; seen: string[] }> = [];
  let first: string | undefined;
  bus.subscribe(
    'bare',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      const tryNumber = (tries.get(message.id) ?? 0) + 1;
      tries.set(message.id, tryNumber);
      first ??= message.id;
      const [row] = (
        await ctx.tx.query<{ xid: string; proof: string }>(`select pg_current_xact_id()::text as xid, current_setting('tidings.proof', true) as proof`)
      ).rows;
      const seen = (await ctx.tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`)).rows.map((r) => r.tenant);
      await ctx.tx.query(`insert into ${s}.effects (id, tenant, scope) values ($1, $2, current_setting('tidings.scope', true))`, [message.id, message.tenant]);
      // The batch's first attempt fails once, after its write: the first pass has no savepoint to roll back to, so the batch runs again.
      if (message.id === first && tryNumber === 1) throw new Error('the first attempt fails');
      ran.push({ id: message.id, tenant: message.tenant!, xid: row!.xid, proof: row!.proof, seen });
    },
    { partitions: 1, batchSize: 10, concurrency: 1, retry: { immediate: 1, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await client.query(`create table ${s}.effects (id text not null, tenant text not null, scope text)`);
  await client.query(`grant select, insert on ${s}.effects to tidings_tenant`);
  // One transaction, so one batch: three of acme's and one of globex's, so two of acme's run one after the other.
  await bus.transaction(async (tx) => {
    for (const [key, tenant] of [
      ['a1', 'acme'],
      ['a2', 'acme'],
      ['g1', 'globex'],
      ['a3', 'acme'],
    ] as const) {
      await bus.publish(Ticked, { key, seq: 1 }, { tx, tenant });
    }
  });
  await waitFor('every message handled', () => ran.length >= 4);
  await sleep(200);

  const { rows } = await client.query<{ id: string; tenant: string; scope: string }>(`select * from ${s}.effects`);
  assert.equal(rows.length, 4, "one write kept per message: the abandoned transaction's were rolled back");
  assert.equal(new Set(rows.map((row) => row.id)).size, 4, 'no message written twice');
  for (const row of rows) assert.equal(row.scope, `t:${row.tenant}`, `${row.id}: written in its tenant's scope`);
  assert.equal(tries.get(first!), 2, 'the failed first attempt ran again');
  assert.equal(ran.length, 4, 'each message got through once');
  assert.equal(new Set(ran.map((r) => r.xid)).size, 1, 'all in one batch transaction, handled again as a whole');
  for (const r of ran) assert.deepEqual(r.seen, [r.tenant], `${r.id}: saw its own tenant's messages only`);
  let shared = 0;
  for (const [i, r] of ran.entries()) {
    const before = ran[i - 1];
    if (before === undefined) continue;
    if (before.tenant === r.tenant) {
      assert.equal(r.proof, before.proof, `${r.id} after ${before.id}, of the same tenant: the scope is shared`);
      shared++;
    } else assert.notEqual(r.proof, before.proof, `${r.id} after ${before.id}, of another tenant: a scope of its own`);
  }
  assert.ok(shared >= 1, 'two attempts of acme ran one after the other');
});

test("isolation: in the first pass (no savepoints), a savepoint one tenant's handler plants does not give a later handler of another tenant its scope", async (t) => {
  const world = await pgWorld(t, 'rlsq', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const found: Array<{ tenant: string; xid: string; tries: number; before: string[]; after?: string[] | string }> = [];
  const tries = new Map<string, number>();
  const tenantsSeen = async (tx: PgTransaction) =>
    (await tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`)).rows.map((row) => row.tenant);
  bus.subscribe(
    'planter',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      tries.set(message.id, (tries.get(message.id) ?? 0) + 1);
      const [{ xid }] = (await ctx.tx.query<{ xid: string }>('select pg_current_xact_id()::text as xid')).rows as [{ xid: string }];
      const before = await tenantsSeen(ctx.tx);
      if (found.length === 0) {
        // The first pass has no attempt's savepoint to step out of: it plants one of its own.
        await ctx.tx.query('savepoint planted');
        found.push({ tenant: message.tenant!, xid, tries: tries.get(message.id)!, before });
        return;
      }
      let after: string[] | string;
      try {
        await ctx.tx.query('rollback to savepoint planted');
        after = await tenantsSeen(ctx.tx);
      } catch (error) {
        after = (error as Error).message;
      }
      found.push({ tenant: message.tenant!, xid, tries: tries.get(message.id)!, before, after });
    },
    { partitions: 1, batchSize: 10, concurrency: 1, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishAcmeAndGlobex(bus);
  await waitFor('both handled', () => found.length >= 2);
  const [planter, later] = found as [(typeof found)[number], (typeof found)[number]];
  assert.notEqual(planter.tenant, later.tenant);
  assert.equal(later.xid, planter.xid, 'both handlers ran in one batch transaction');
  assert.equal(planter.tries, 1, 'the planter ran once: in the first pass, nothing failed');
  assert.deepEqual(planter.before, [planter.tenant]);
  assert.deepEqual(later.before, [later.tenant]);
  assert.deepEqual(later.after, [], "the scope the rollback brought back is bound to an older entry: nothing is visible, not the planter's rows");
});

/** A one-shot signal between handlers; waiting fails after `ms` (the handlers took turns where they should not). */
function latch(what: string, ms = 5_000): { open(): void; wait(): Promise<void> } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => {
    open = resolve;
  });
  return {
    open,
    async wait() {
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} did not come within ${ms} ms`)), ms);
      });
      try {
        await Promise.race([opened, late]);
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

/** Publishes one message per entry of `tenants` (key `k<i>`) in one transaction, so they are read in one batch. */
async function publishOneBatch(bus: Bus<PgTransaction>, tenants: readonly string[]): Promise<void> {
  await bus.transaction(async (tx) => {
    for (const [i, tenant] of tenants.entries()) await bus.publish(Ticked, { key: `k${i}`, seq: i }, { tx, tenant });
  });
}

/** Replies rows a handler wrote, as a privileged session sees them: tenant (set by the column's default, from the proven scope) by request id. */
/** The tenant of each row of `table` that `tx` sees, in order ('-' for none). */
async function tenantsSeen(tx: PgTransaction, table: string): Promise<string[]> {
  return (await tx.query<{ tenant: string }>(`select coalesce(tenant, '-') as tenant from ${table} order by 1`)).rows.map((row) => row.tenant);
}

async function repliesWritten(schema: string): Promise<Array<{ request_id: string; tenant: string | null }>> {
  const client = await connect();
  try {
    return (await client.query<{ request_id: string; tenant: string | null }>(`select request_id, tenant from "${schema}".replies order by request_id`)).rows;
  } finally {
    await client.end();
  }
}

test('isolation, first pass: handlers of several tenants write through ctx.tx at once, their statements interleaved: every row under its own tenant, none lost or twice, none seen by another tenant', async (t) => {
  const world = await pgWorld(t, 'rlsi', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const tenants = ['acme', 'globex', 'initech', 'acme', 'globex', 'initech', 'acme', 'globex', 'initech'];
  const runs: Array<{ id: string; tenant: string; attempt: number; xid: string; seen: string[]; seenLog: string[] }> = [];
  let firstWrites = 0;
  // Opened once every handler has written its first row: waiting for it deadlocks handlers that take turns.
  const allWrote = latch('every handler writing at once');
  bus.subscribe(
    'writers',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      const [{ xid }] = (await ctx.tx.query<{ xid: string }>('select pg_current_xact_id()::text as xid')).rows as [{ xid: string }];
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ($1, '{}')`, [`${message.id}/1`]);
      if (++firstWrites === tenants.length) allWrote.open();
      await allWrote.wait();
      // Every tenant's rows are there now, each written by a statement interleaved with the others'.
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ($1, '{}')`, [`${message.id}/2`]);
      const seen = (await ctx.tx.query<{ request_id: string }>(`select request_id from ${s}.replies order by 1`)).rows.map((row) => row.request_id);
      const seenLog = (await ctx.tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`)).rows.map((row) => row.tenant);
      runs.push({ id: message.id, tenant: message.tenant!, attempt: ctx.attempt, xid, seen, seenLog });
    },
    { partitions: 1, batchSize: 50, concurrency: tenants.length, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishOneBatch(bus, tenants);
  await waitFor('every handler done', () => runs.length >= tenants.length);
  await waitFor('the batch committed', async () => (await repliesWritten(world.schema)).length >= 2 * tenants.length);
  await sleep(200);

  assert.equal(runs.length, tenants.length, 'each handler ran once: the first pass was kept, not handled again');
  assert.equal(new Set(runs.map((run) => run.xid)).size, 1, 'all in one batch transaction');
  assert.ok(
    runs.every((run) => run.attempt === 1),
    'no attempt failed',
  );
  const tenantOf = new Map(runs.map((run) => [run.id, run.tenant]));
  const rows = await repliesWritten(world.schema);
  assert.equal(rows.length, 2 * tenants.length, 'two rows per handler: none lost');
  assert.equal(new Set(rows.map((row) => row.request_id)).size, rows.length, 'none written twice');
  for (const row of rows) {
    assert.equal(
      row.tenant,
      tenantOf.get(row.request_id.split('/')[0]!),
      `${row.request_id}: under its handler's tenant (the column's default, from the proven scope)`,
    );
  }
  for (const run of runs) {
    const own = rows.filter((row) => row.tenant === run.tenant).map((row) => row.request_id);
    assert.deepEqual(run.seen, own, `${run.id} (${run.tenant}): sees every row of its tenant's handlers and none of another tenant's`);
    assert.deepEqual(run.seenLog, [run.tenant], `${run.id} (${run.tenant}): sees its tenant's messages only`);
  }
});

test("isolation, first pass: a handler's select sent after another tenant's insert, in the same transaction, does not see it", async (t) => {
  const world = await pgWorld(t, 'rlsv', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const acmeWrote = latch("acme's insert");
  const globexWrote = latch("globex's insert");
  const found = new Map<string, { xid: string; scopes: string[]; replies: string[]; log: string[] }>();
  let runs = 0;
  bus.subscribe(
    'pair',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      runs++;
      const tenant = message.tenant!;
      const scopes: string[] = [];
      const write = async () => {
        const { rows } = await ctx.tx.query<{ scope: string }>(
          `insert into ${s}.replies (request_id, data) values ($1, '{}') returning current_setting('tidings.scope') as scope`,
          [tenant],
        );
        scopes.push(rows[0]!.scope);
      };
      // acme writes, then waits for globex's insert; globex waits for acme's, writes, and only then lets acme read.
      if (tenant === 'acme') {
        await write();
        acmeWrote.open();
        await globexWrote.wait();
      } else {
        await acmeWrote.wait();
        await write();
        globexWrote.open();
      }
      const { rows } = await ctx.tx.query<{ xid: string; scope: string }>(
        `select pg_current_xact_id()::text as xid, current_setting('tidings.scope') as scope`,
      );
      scopes.push(rows[0]!.scope);
      const replies = (await ctx.tx.query<{ request_id: string }>(`select request_id from ${s}.replies order by 1`)).rows.map((row) => row.request_id);
      const log = (await ctx.tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`)).rows.map((row) => row.tenant);
      found.set(tenant, { xid: rows[0]!.xid, scopes, replies, log });
    },
    { partitions: 1, batchSize: 10, concurrency: 2, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishAcmeAndGlobex(bus);
  await waitFor('both handled', () => found.size >= 2);
  await waitFor('the batch committed', async () => (await repliesWritten(world.schema)).length >= 2);
  const acme = found.get('acme')!;
  const globex = found.get('globex')!;
  assert.equal(acme.xid, globex.xid, 'both handlers ran in one batch transaction');
  assert.equal(runs, 2, 'each handler ran once: their statements interleaved, neither waited for the other to end');
  assert.deepEqual(acme.scopes, ['t:acme', 't:acme'], "each of acme's statements ran in acme's scope, globex's statement between them");
  assert.deepEqual(globex.scopes, ['t:globex', 't:globex']);
  assert.deepEqual(acme.replies, ['acme'], "acme's select, sent after globex's insert, sees acme's row only");
  assert.deepEqual(globex.replies, ['globex']);
  assert.deepEqual(acme.log, ['acme']);
  assert.deepEqual(globex.log, ['globex']);
  assert.deepEqual(
    (await repliesWritten(world.schema)).map((row) => `${row.request_id}:${row.tenant}`),
    ['acme:acme', 'globex:globex'],
  );
});

test('isolation: a handler failing mid-batch after others wrote in the first pass: the batch is handled again carefully, every write kept once', async (t) => {
  const world = await pgWorld(t, 'rlsf', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const tenants = ['acme', 'globex', 'initech', 'acme', 'globex', 'initech'];
  const victimSeq = 3;
  const runs: Array<{ id: string; seq: number; tenant: string; attempt: number; xid: string; failed: boolean }> = [];
  let firstWrites = 0;
  const othersWrote = latch('every first-pass handler writing');
  bus.subscribe(
    'writers',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      const { seq } = message.data;
      const firstPass = !runs.some((run) => run.id === message.id);
      const [{ xid }] = (await ctx.tx.query<{ xid: string }>('select pg_current_xact_id()::text as xid')).rows as [{ xid: string }];
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ($1, '{}')`, [message.id]);
      // The victim fails in the first pass once every handler wrote, and in the careful pass at its first attempt
      // (its savepoint undoes that write alone); its second attempt there succeeds.
      const failed = seq === victimSeq && (firstPass || ctx.attempt === 1);
      runs.push({ id: message.id, seq, tenant: message.tenant!, attempt: ctx.attempt, xid, failed });
      if (firstPass && ++firstWrites === tenants.length) othersWrote.open();
      if (firstPass && seq === victimSeq) await othersWrote.wait();
      if (failed) throw new Error(`message ${seq} fails`);
    },
    { partitions: 1, batchSize: 50, concurrency: tenants.length, retry: { immediate: 1, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishOneBatch(bus, tenants);
  await waitFor('the batch committed', async () => (await repliesWritten(world.schema)).length >= tenants.length);
  await sleep(300);

  const rows = await repliesWritten(world.schema);
  assert.equal(rows.length, tenants.length, "one row per message: the first pass was rolled back, and so was the victim's failed careful attempt");
  const tenantOf = new Map(runs.map((run) => [run.id, run.tenant]));
  for (const row of rows) assert.equal(row.tenant, tenantOf.get(row.request_id), `${row.request_id}: under its tenant`);
  const [first, careful, ...more] = [...new Set(runs.map((run) => run.xid))];
  assert.equal(more.length, 0, 'two transactions: the first pass and the careful one');
  const firstPass = runs.filter((run) => run.xid === first);
  assert.equal(firstPass.length, tenants.length, 'in the first pass every handler wrote');
  const carefulPass = runs.filter((run) => run.xid === careful);
  assert.equal(carefulPass.length, tenants.length + 1, 'handled again carefully: each once, the victim twice');
  assert.deepEqual(
    carefulPass.filter((run) => run.seq === victimSeq).map((run) => `${run.attempt}:${run.failed}`),
    ['1:true', '2:false'],
    'the victim failed its first careful attempt and was retried in the same transaction',
  );
});

test("isolation, first pass: a handler's `rollback to savepoint` after another tenant's statement (no failure) reveals nothing: the restored scope proves nothing", async (t) => {
  const world = await pgWorld(t, 'rlsk', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const saved = latch("acme's savepoint");
  const globexWrote = latch("globex's insert");
  const rolledBack = latch("acme's rollback");
  const found = new Map<string, Record<string, unknown>>();
  const rows = (tx: PgTransaction, table: string) => tenantsSeen(tx, `${s}.${table}`);
  bus.subscribe(
    'rollback',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      if (message.tenant === 'acme') {
        await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ('acme-before', '{}')`);
        await ctx.tx.query('savepoint x');
        saved.open();
        await globexWrote.wait();
        // No statement failed, so the batch is not handled again: this undoes globex's insert too.
        await ctx.tx.query('rollback to savepoint x');
        found.set('acme', { replies: await rows(ctx.tx, 'replies'), log: await rows(ctx.tx, 'log') });
        rolledBack.open();
        return;
      }
      await saved.wait();
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ('globex', '{}')`);
      const before = await rows(ctx.tx, 'replies');
      globexWrote.open();
      await rolledBack.wait();
      found.set('globex', { before, replies: await rows(ctx.tx, 'replies'), log: await rows(ctx.tx, 'log') });
    },
    { partitions: 1, batchSize: 10, concurrency: 2, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishAcmeAndGlobex(bus);
  await waitFor('both handled', () => found.size >= 2);
  await sleep(300);
  const acme = found.get('acme')!;
  const globex = found.get('globex')!;
  // acme's scope, brought back by its rollback, is bound to an entry older than globex's: acme sees nothing at all.
  assert.deepEqual(acme.replies, [], "after its rollback, acme sees nothing: not globex's rows, not even its own");
  assert.deepEqual(acme.log, []);
  // globex's next statements enter its scope again: its tenant's rows, none of acme's.
  assert.deepEqual(globex.before, ['globex']);
  assert.deepEqual(globex.replies, [], "globex's insert was undone by acme's rollback (the hazard docs/tenancy.md names), and acme's row is not shown to it");
  assert.deepEqual(globex.log, ['globex']);
  assert.deepEqual(
    (await repliesWritten(world.schema)).map((row) => `${row.request_id}:${row.tenant}`),
    ['acme-before:acme'],
    "committed: acme's row before its savepoint; globex's was undone by acme's rollback, as it would be without isolation",
  );
});

test("isolation, first pass: a handler's `rollback to savepoint` planted by another tenant's handler, with no failure, shows it nothing of that tenant", async (t) => {
  const world = await pgWorld(t, 'rlsm', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const saved = latch("acme's savepoint");
  const globexDone = latch("globex's rollback");
  const found = new Map<string, Record<string, unknown>>();
  const rows = (tx: PgTransaction, table: string) => tenantsSeen(tx, `${s}.${table}`);
  bus.subscribe(
    'rollback',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      if (message.tenant === 'acme') {
        await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ('acme', '{}')`);
        await ctx.tx.query('savepoint x');
        saved.open();
        await globexDone.wait();
        found.set('acme', { replies: await rows(ctx.tx, 'replies'), log: await rows(ctx.tx, 'log') });
        return;
      }
      await saved.wait();
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ('globex', '{}')`);
      // Back to acme's savepoint: acme's scope and proof as they were then.
      await ctx.tx.query('rollback to savepoint x');
      found.set('globex', { replies: await rows(ctx.tx, 'replies'), log: await rows(ctx.tx, 'log') });
      globexDone.open();
    },
    { partitions: 1, batchSize: 10, concurrency: 2, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishAcmeAndGlobex(bus);
  await waitFor('both handled', () => found.size >= 2);
  await sleep(300);
  const acme = found.get('acme')!;
  const globex = found.get('globex')!;
  assert.deepEqual(globex.replies, [], "after the rollback globex sees nothing: acme's restored proof is bound to an older entry");
  assert.deepEqual(globex.log, []);
  assert.deepEqual(acme.replies, ['acme'], "acme's next statement enters its scope again");
  assert.deepEqual(acme.log, ['acme']);
  assert.deepEqual(
    (await repliesWritten(world.schema)).map((row) => `${row.request_id}:${row.tenant}`),
    ['acme:acme'],
    "committed: acme's row; globex undid its own insert",
  );
});

test('isolation, first pass: statements sent behind one that failed hand back nothing, even if a `rollback to savepoint` revives the transaction', async (t) => {
  const world = await pgWorld(t, 'rlsa', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const saved = latch("acme's savepoint");
  const found = new Map<string, unknown>();
  bus.subscribe(
    'revive',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      if (found.has(message.tenant!)) return; // the careful pass: nothing more to learn
      if (message.tenant === 'acme') {
        // A query config object would run unread, past the check of statements that may roll back.
        const config = { text: 'rollback to savepoint sp' } as unknown as string;
        found.set(
          'config',
          await ctx.tx.query(config).then(
            () => 'ran',
            (error: Error) => error.message,
          ),
        );
        await ctx.tx.query('savepoint sp');
        // Fails, and globex's statements are queued behind it before its answer is back.
        const failing = ctx.tx.query('select 1/0');
        saved.open();
        found.set('acme', (await Promise.allSettled([failing]))[0]!.status);
        return;
      }
      await saved.wait();
      // Sent without waiting: its scope's entry fails (the transaction is aborted), the rollback revives the
      // transaction with acme's scope and proof as they were at `sp`, and no entry came after them.
      const settled = await Promise.allSettled([
        ctx.tx.query('rollback to savepoint sp'),
        ctx.tx.query<{ tenant: string }>(`select distinct tenant from ${s}.log order by 1`),
      ]);
      found.set(
        'globex',
        settled.map((outcome) => (outcome.status === 'fulfilled' ? outcome.value.rows.map((row) => (row as { tenant?: string }).tenant ?? '-') : 'failed')),
      );
    },
    { partitions: 1, batchSize: 10, concurrency: 2, retry: { immediate: 0, delayed: [], jitter: 0 } },
  );
  await bus.start();
  await publishAcmeAndGlobex(bus);
  await waitFor('both handled', () => found.has('acme') && found.has('globex'));
  assert.match(String(found.get('config')), /must be a string under tenancy isolation/);
  assert.equal(found.get('acme'), 'rejected');
  assert.deepEqual(found.get('globex'), ['failed', 'failed'], "globex's statements, sent behind acme's failed one, hand back nothing: not acme's rows");
});

test('isolation: what a handler publishes and its saga rows carry its tenant; a cross-tenant subscription sees every tenant, never the consumer tables', async (t) => {
  const world = await pgWorld(t, 'rlsx', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  const seen: Array<{ tenants: unknown[]; cursors: number }> = [];
  let followUps = 0;
  bus.subscribe(
    'writer',
    Ticked,
    async (message, ctx) => {
      if (message.data.note === 'follow-up') {
        followUps++;
        return;
      }
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ($1, '{}')`, [`r-${message.id}`]);
      await ctx.publish(Ticked, { key: message.key, seq: message.data.seq + 100, note: 'follow-up' });
    },
    { partitions: 1 },
  );
  bus.subscribe(
    'auditor',
    Ticked,
    async (_message, ctx) => {
      const tenants = (await ctx.tx.query<{ tenant: string }>(`select distinct coalesce(tenant, '-') as tenant from ${s}.log order by 1`)).rows.map(
        (row) => row.tenant,
      );
      const cursors = (await ctx.tx.query(`select * from ${s}.cursors`)).rows.length;
      seen.push({ tenants, cursors });
    },
    { crossTenant: true, partitions: 1 },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1 }, { tenant: 'acme' });
  await bus.publish(Ticked, { key: 'g', seq: 2 }, { tenant: 'globex' });
  await waitFor('the follow-ups', () => followUps >= 2);
  await waitFor('the auditor', () => seen.some((entry) => entry.tenants.length >= 2));
  await sleep(100);
  assert.ok(
    seen.every((entry) => entry.cursors === 0),
    'a cross-tenant handler sees no cursor',
  );
  const client = await connect();
  try {
    const { rows } = await client.query(`select tenant, data->>'seq' as seq from ${s}.log order by position`);
    assert.deepEqual(rows.map((row) => `${row.tenant}:${row.seq}`).sort(), ['acme:1', 'acme:101', 'globex:102', 'globex:2']);
    const { rows: replies } = await client.query(`select tenant from ${s}.replies order by tenant`);
    assert.deepEqual(
      replies.map((row) => row.tenant),
      ['acme', 'globex'],
      "a row a handler writes carries its tenant (the column's default)",
    );
  } finally {
    await client.end();
  }
});

test('isolation: refused on embedded PostgreSQL and with a role that bypasses it, by name', async (t) => {
  const world = await pgWorld(t, 'rlsr');
  if (world === undefined) return;
  const { postgres } = await import('../src/postgres/index.ts');
  assert.throws(() => postgres({ pglite: true, tenancy: { isolation: 'rls' } }), /tenancy.isolation 'rls' needs a PostgreSQL server/);
  assert.throws(() => postgres({ url: 'postgres://x@localhost/db', tenancy: { isolation: 'rls', role: 'Bad-Role' } }), /tenancy.role/);
  const client = await connect();
  try {
    await client.query('do $$ begin create role tidings_bypass bypassrls; exception when duplicate_object then null; end $$');
  } finally {
    await client.end();
  }
  const bus = world.bus('test', { tenancy: { isolation: 'rls', role: 'tidings_bypass' } });
  await assert.rejects(bus.start(), /bypasses row-level security/);
});

test("isolation, first pass: a batch's handlers start tenant by tenant, so its tenants' statements enter their scopes once each, not once per message", async (t) => {
  const world = await pgWorld(t, 'rlsorder', rls);
  if (world === undefined) return;
  const bus = world.bus();
  const s = `"${world.schema}"`;
  // 40 messages of 4 tenants, interleaved as they were published: a, b, c, d, a, b, ...
  const tenants = Array.from({ length: 40 }, (_, i) => ['acme', 'globex', 'initech', 'umbrella'][i % 4]!);
  const wrote = new Map<string, string>();
  bus.subscribe(
    'writers',
    Ticked,
    async (message: Message<{ key: string; seq: number }>, ctx) => {
      await ctx.tx.query(`insert into ${s}.replies (request_id, data) values ($1, '{}')`, [message.id]);
      wrote.set(message.id, message.tenant!);
    },
    { partitions: 1, batchSize: 50, concurrency: 4 },
  );
  // A scope entered advances the sequence tenancy_entries once (migration 018).
  const entries = async () => {
    const client = await connect();
    try {
      return Number((await client.query(`select coalesce(pg_sequence_last_value('${s}.tenancy_entries'), 0) as n`)).rows[0].n);
    } finally {
      await client.end();
    }
  };
  await bus.start();
  const before = await entries();
  await publishOneBatch(bus, tenants);
  await waitFor('every handler done', () => wrote.size === tenants.length);
  await waitFor('the batch committed', async () => (await repliesWritten(world.schema)).length === tenants.length);
  const entered = (await entries()) - before;
  const rows = await repliesWritten(world.schema);
  assert.deepEqual(
    rows.map((row) => row.tenant),
    rows.map((row) => wrote.get(row.request_id)),
    'every row under its own tenant',
  );
  t.diagnostic(`${tenants.length} messages of 4 tenants, interleaved: ${entered} scopes entered`);
  // In read order, four handlers at a time of four different tenants: a scope entered for almost every statement.
  assert.ok(entered <= 12, `${entered} scopes entered for 40 statements of 4 tenants`);
});
