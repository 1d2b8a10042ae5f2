/**
 * The consumer's read is a prepared statement: after five runs PostgreSQL may keep one generic plan for it,
 * made without the parameters' values. That plan must find a window's messages through the xid index
 * whatever the log's size; a plan that walks the log in position order (or scans it) costs time in
 * proportion to the whole log on every read. Checked on the plan itself, not on a timing.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import pg from 'pg';
import { createBus } from '../src/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { type PgPoolLike, pgDriver } from '../src/postgres/connection/pg.ts';
import { statements } from '../src/postgres/statements.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, DATABASE_URL, dropSchema, requirePostgres, uniqueSchema, waitFor } from './helpers.ts';

const schemas: string[] = [];
after(async () => {
  for (const schema of schemas) await dropSchema(schema);
});

interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Index Name'?: string;
  'Rows Removed by Filter'?: number;
  Plans?: PlanNode[];
}

/** A schema of its own, migrated by a bus that then stops. */
async function migratedSchema(): Promise<string> {
  const schema = uniqueSchema('plan');
  schemas.push(schema);
  const bus = createBus({ service: 'plans', backbone: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined }) });
  await bus.transaction(async () => undefined); // creates the schema
  await bus.stop();
  return schema;
}

/** A snapshot taken now with its floor (migration 017): the log's last position, then the next xid. */
async function floorNow(client: pg.Client, schema: string): Promise<{ done: string; last: string; next_xid: string }> {
  const { rows } = await client.query<{ done: string; last: string; next_xid: string }>(
    `select snap::text as done, last, (pg_snapshot_xmax(snap)::text::int8 + age(pg_snapshot_xmax(snap)::xid))::text as next_xid
     from (select pg_current_snapshot() as snap, coalesce(pg_sequence_last_value('${schema}.log_position_seq'::regclass), 0) as last offset 0) taken`,
  );
  return rows[0]!;
}

function nodes(plan: PlanNode): PlanNode[] {
  return [plan, ...(plan.Plans ?? []).flatMap(nodes)];
}

test("the generic plan of the consumer's read opens a window on a log of 200,000 without scanning it or sorting the window: through the xid index, or from the window's floor in position order", async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = await migratedSchema();
  const client = await connect();
  try {
    const fill = (from: number, to: number) =>
      client.query(
        `insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         select $1, 'm' || g, $1, 'tidings://plans', now(), 'k' || (g % 100), g % 100, 'm' || g, jsonb_build_object('key', 'k' || (g % 100), 'seq', g)
         from generate_series($2::int, $3::int) g`,
        [Ticked.topic, from, to],
      );
    // As a live log has, few messages per transaction: 100,000 messages from 5,000 transactions, handled
    // (`middle`: a `done` taken after them, with its floor, as the consumer's read takes a window: migration
    // 016), then 100,000 more, then `done` and 10 more.
    await client.query('set synchronous_commit = off');
    const fillTransactions = (first: number) =>
      client.query(
        `do $$ begin for t in ${first}..${first + 4999} loop
           insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, data)
           select '${Ticked.topic}', 'm' || g, '${Ticked.topic}', 'tidings://plans', now(), 'k' || (g % 100), g % 100, 'm' || g, jsonb_build_object('key', 'k' || (g % 100), 'seq', g)
           from generate_series(t * 20 + 1, t * 20 + 20) g;
           commit;
         end loop; end $$`,
      );
    await fillTransactions(0);
    const middle = await floorNow(client, schema);
    assert.equal(middle.last, '100000');
    await fillTransactions(5000);
    // `done`: a snapshot taken after those, so the window holds only the 10 published next.
    const { rows } = await client.query<{ done: string }>('select pg_current_snapshot()::text as done');
    const done = rows[0]!.done;
    await fill(200_001, 200_010);
    await client.query(`analyze ${schema}.log`);
    await client.query('set plan_cache_mode = force_generic_plan');
    await client.query(
      `prepare read(text[], text[], text[], int8[], text[], int, int, int8[], int8[], int8[], text[], text) as ${statements(schema).readLanes(true, false, false)}`,
    );
    // The fair read (tenantConcurrency): the same scan, its rows numbered per tenant.
    await client.query(
      `prepare fair(text[], text[], text[], int8[], text[], int, int, int8[], int8[], int8[], text[], text, text[], text[], int, text, int) as ${statements(schema).readLanes(true, false, true)}`,
    );
    // `done`'s floor unknown (a cursor of a version before migration 017): the window's transactions are found by xid.
    const args = `'{"{0,1,2,3}"}', '{"${done}"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{NULL}', '{NULL}', 'plans'`;
    for (const execute of [`execute read(${args})`, `execute fair(${args}, '{NULL}', '{NULL}', 125, '{}', 125)`]) {
      const explained = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(`explain (analyze, format json) ${execute}`);
      const all = nodes(explained.rows[0]!['QUERY PLAN'][0]!.Plan);
      const onLog = all.filter((node) => node['Relation Name'] === 'log');
      t.diagnostic(
        `${execute.slice(8, 12)}: ${JSON.stringify(onLog.map((node) => `${node['Node Type']} ${node['Index Name'] ?? ''} removed ${node['Rows Removed by Filter'] ?? 0}`))}`,
      );
      assert.ok(!onLog.some((node) => node['Node Type'] === 'Seq Scan'), `${execute}: no sequential scan of the log`);
      assert.ok(
        all.some((node) => node['Index Name'] === 'log_xid'),
        `${execute}: the xid index finds the window`,
      );
      const examined = onLog.reduce((sum, node) => sum + (node['Rows Removed by Filter'] ?? 0), 0);
      assert.ok(examined < 100, `${execute}: rows read and thrown away: ${examined}`);
      const returned = all.find((node) => node['Node Type'] === 'Limit') as (PlanNode & { 'Actual Rows'?: number }) | undefined;
      assert.equal(returned?.['Actual Rows'], 10, `${execute}: the window holds the 10 messages committed after done`);
    }

    // With a floor: from `middle` a window of 100,010 messages, from the beginning one of 200,010. The first
    // read takes 500 of them from the floor on, in position order, and reads little more: the floor's
    // transactions through the xid index, no walk of the log before the floor, no sort of the window.
    for (const [from, last, nextXid] of [
      [middle.done, middle.last, middle.next_xid],
      ['1:1:', '0', '1'],
    ]) {
      const backlog = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(
        `explain (analyze, format json) execute read('{"{0,1,2,3}"}', '{"${from}"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{${last}}', '{${nextXid}}', 'plans')`,
      );
      const plan = nodes(backlog.rows[0]!['QUERY PLAN'][0]!.Plan) as Array<PlanNode & { 'Actual Rows'?: number; 'Actual Loops'?: number }>;
      const onLogRows = plan.filter((node) => node['Relation Name'] === 'log');
      t.diagnostic(
        `from ${from}: ${JSON.stringify(onLogRows.map((node) => `${node['Node Type']} ${node['Index Name'] ?? ''} rows ${node['Actual Rows']} removed ${node['Rows Removed by Filter'] ?? 0}`))}`,
      );
      assert.ok(!onLogRows.some((node) => node['Node Type'] === 'Seq Scan'), 'no sequential scan of the log');
      assert.ok(!plan.some((node) => node['Node Type'] === 'Sort'), 'no sort of the window');
      const read = plan
        .filter((node) => node['Relation Name'] === 'log' || node['Index Name']?.startsWith('log_'))
        .reduce((sum, node) => sum + (node['Actual Rows'] ?? 0) * (node['Actual Loops'] ?? 1) + (node['Rows Removed by Filter'] ?? 0), 0);
      assert.ok(read < 2_000, `log rows read for a batch of 500 from ${from}: ${read}`);
      assert.equal(plan.find((node) => node['Node Type'] === 'Limit')?.['Actual Rows'], 500, 'a full batch');
    }

    // The inbox grows under the plan made while it was empty (the consumer's read is prepared once per name).
    await client.query(`insert into ${schema}.inbox (subscription, message_id) select 'plans', 'x' || g from generate_series(1, 200000) g`);
    const inboxLookups = async (statement: string) => {
      const explained = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(
        `explain (analyze, format json) execute ${statement}('{"{0,1,2,3}"}', '{"1:1:"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{0}', '{1}', 'plans')`,
      );
      const plan = nodes(explained.rows[0]!['QUERY PLAN'][0]!.Plan) as Array<PlanNode & { 'Actual Rows'?: number; 'Actual Loops'?: number }>;
      const onInbox = plan.filter((node) => node['Relation Name'] === 'inbox' || node['Index Name'] === 'inbox_pkey');
      t.diagnostic(`${statement}: ${JSON.stringify(onInbox.map((node) => `${node['Node Type']} rows ${node['Actual Rows']} loops ${node['Actual Loops']}`))}`);
      return onInbox.reduce((sum, node) => sum + (node['Actual Rows'] ?? 0) * (node['Actual Loops'] ?? 1), 0);
    };
    const stale = await inboxLookups('read');
    await client.query(
      `prepare read_again(text[], text[], text[], int8[], text[], int, int, int8[], int8[], int8[], text[], text) as ${statements(schema).readLanes(true, false, false)}`,
    );
    const fresh = await inboxLookups('read_again');
    t.diagnostic(`inbox rows touched for a read of 500: ${stale} by the plan made on an empty inbox, ${fresh} planned again`);
    // Without `offset 0` in the lookup, the plan made on an empty inbox hashed the subscription's 200,000 ids
    // at every read (PostgreSQL 15); now either plan probes the inbox for the batch's ids alone, so the read
    // need not be planned again as the inbox grows (consume/lanes.ts, planAfterRead).
    assert.ok(stale < 2_000, `inbox rows touched by a read of 500 planned on an empty inbox, now 200,000: ${stale}`);
    assert.ok(fresh < 2_000, `inbox rows touched by a read of 500 planned on an inbox of 200,000: ${fresh}`);
  } finally {
    await client.end();
  }
});

test("a log written by few large transactions (bulk loads): the window's floor is still found through the xid index, not a scan", async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = await migratedSchema();
  const client = await connect();
  try {
    // Two transactions of 100,000 messages each: the statistics see two xids, each "most of the log".
    const bulk = (from: number) =>
      client.query(
        `insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         select $1, 'm' || g, $1, 'tidings://plans', now(), 'k' || (g % 100), g % 100, 'm' || g, jsonb_build_object('key', 'k' || (g % 100), 'seq', g)
         from generate_series($2::int, $2::int + 99999) g`,
        [Ticked.topic, from],
      );
    await bulk(1);
    const { done, last, next_xid: nextXid } = await floorNow(client, schema);
    await bulk(100_001);
    await client.query(`analyze ${schema}.log`);
    await client.query('set plan_cache_mode = force_generic_plan');
    await client.query(
      `prepare read(text[], text[], text[], int8[], text[], int, int, int8[], int8[], int8[], text[], text) as ${statements(schema).readLanes(true, false, false)}`,
    );
    const explained = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(
      `explain (analyze, format json) execute read('{"{0,1,2,3}"}', '{"${done}"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{${last}}', '{${nextXid}}', 'plans')`,
    );
    const plan = nodes(explained.rows[0]!['QUERY PLAN'][0]!.Plan) as Array<PlanNode & { 'Actual Rows'?: number }>;
    const onLog = plan.filter((node) => node['Relation Name'] === 'log');
    t.diagnostic(JSON.stringify(onLog.map((node) => `${node['Node Type']} ${node['Index Name'] ?? ''} removed ${node['Rows Removed by Filter'] ?? 0}`)));
    assert.ok(!onLog.some((node) => node['Node Type'] === 'Seq Scan'), 'no sequential scan of the log');
    assert.ok(
      onLog.some((node) => node['Index Name'] === 'log_xid'),
      'the xid index finds the transactions of the floor',
    );
    assert.equal(plan.find((node) => node['Node Type'] === 'Limit')?.['Actual Rows'], 500, 'a full batch');
  } finally {
    await client.end();
  }
});

test('fair reads: a split-off tenant opening a window of 100,000 of its messages reads its share of them, not the window', async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = await migratedSchema();
  const client = await connect();
  try {
    // The noisy tenant's backlog, and a quiet tenant's messages among it.
    await client.query(
      `insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, tenant, data)
       select $1, 'm' || g, $1, 'tidings://plans', now(), 'k' || (g % 100), g % 100, 'm' || g, case when g % 100 = 0 then 'quiet' else 'noisy' end,
         jsonb_build_object('key', 'k' || (g % 100), 'seq', g)
       from generate_series(1, 100000) g`,
      [Ticked.topic],
    );
    await client.query(`analyze ${schema}.log`);
    await client.query('set plan_cache_mode = force_generic_plan');
    await client.query(
      `prepare fair(text[], text[], text[], int8[], text[], int, int, int8[], int8[], int8[], text[], text, text[], text[], int, text, int) as ${statements(schema).readLanes(true, false, true)}`,
    );
    /** Runs `execute` under EXPLAIN ANALYZE: the plan's nodes, and the log rows it read (returned or thrown away). */
    const explainRead = async (execute: string) => {
      const explained = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(`explain (analyze, format json) ${execute}`);
      const plan = nodes(explained.rows[0]!['QUERY PLAN'][0]!.Plan) as Array<PlanNode & { 'Actual Rows'?: number; 'Actual Loops'?: number }>;
      const onLog = plan.filter((node) => node['Relation Name'] === 'log');
      t.diagnostic(
        JSON.stringify(
          onLog.map((node) => `${node['Node Type']} ${node['Index Name'] ?? ''} rows ${node['Actual Rows']} removed ${node['Rows Removed by Filter'] ?? 0}`),
        ),
      );
      assert.ok(!onLog.some((node) => node['Node Type'] === 'Seq Scan'), 'no sequential scan of the log');
      const read = onLog.reduce((sum, node) => sum + (node['Actual Rows'] ?? 0) * (node['Actual Loops'] ?? 1) + (node['Rows Removed by Filter'] ?? 0), 0);
      return { plan, read };
    };
    // The tenant's cursor from the beginning (floor 0), its window not opened yet: the first read opens it.
    const tenant = await explainRead(
      `execute fair('{"{0,1,2,3}"}', '{"1:1:"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{0}', '{1}', 'plans', '{noisy}', '{NULL}', 125, '{}', 125)`,
    );
    assert.ok(tenant.read < 1_000, `log rows read for the tenant's share of 125: ${tenant.read}`);
    assert.equal(tenant.plan.find((node) => node['Node Type'] === 'Limit' && node['Actual Rows'] !== 0)?.['Actual Rows'], 125, "the tenant's share");

    // The partition's own cursor opening a window numbers its rows per tenant: it reads at most 100 batches'
    // positions from the floor (50,000 at 500 a batch), not the whole window. (Here a batch of 200.)
    const lane = await explainRead(
      `execute fair('{"{0,1,2,3}"}', '{"1:1:"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 200, '{NULL}', '{200}', '{0}', '{1}', 'plans', '{NULL}', '{NULL}', 50, '{}', 50)`,
    );
    assert.ok(lane.read < 21_000, `log rows read by the partition's cursor opening a window of 100,000: ${lane.read}`);
  } finally {
    await client.end();
  }
});

test("the consumer's read runs where the generic plan is forced; without JIT; the pool's connections (users' transactions) keep PostgreSQL's defaults", async (t) => {
  if (!(await requirePostgres(t))) return;
  const driver = await pgDriver({ url: DATABASE_URL, poolSize: 2, name: 'plans' });
  try {
    const mode = "select current_setting('plan_cache_mode') as mode";
    const read = await driver.planned<{ mode: string }>('tidings.test.plan-mode', mode, []);
    assert.equal(read.rows[0]!.mode, 'force_generic_plan');
    const jit = await driver.planned<{ jit: string }>('tidings.test.jit', "select current_setting('jit') as jit", []);
    assert.equal(jit.rows[0]!.jit, 'off', 'no JIT compilation of a read');
    assert.equal((await driver.query<{ mode: string }>(mode)).rows[0]!.mode, 'auto');
    assert.equal(await driver.transaction(async (tx) => (await tx.query<{ mode: string }>(mode)).rows[0]!.mode), 'auto');
  } finally {
    await driver.close();
  }
});

test("given the user's own pool, the consumer's read runs on it (Tidings opens no connection beside it)", async (t) => {
  if (!(await requirePostgres(t))) return;
  const name = `plans-own-${process.pid}`;
  const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 2 });
  pool.on('error', () => undefined);
  const driver = await pgDriver({ pool: pool as unknown as PgPoolLike, poolSize: 2, name });
  try {
    const mode = "select current_setting('plan_cache_mode') as mode";
    const read = await driver.planned<{ mode: string }>('tidings.test.plan-mode', mode, []);
    assert.equal(read.rows[0]!.mode, 'auto', "the user's connection, with the server's default");
    assert.equal(pool.totalCount, 1, "the read took a connection of the user's pool");
    const readers = await driver.query<{ n: string }>('select count(*) as n from pg_stat_activity where application_name = $1', [`tidings-reader:${name}`]);
    assert.equal(Number(readers.rows[0]!.n), 0, 'no reader connection of its own');
  } finally {
    await driver.close();
    await pool.end();
  }
});

test("a consumer's start opens its reader's connections and plans its read on each, before any message: the first reads wait for neither", async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('warm');
  schemas.push(schema);
  const bus = createBus({ service: 'plans', backbone: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined }) });
  bus.subscribe('warm', Ticked, async () => undefined);
  const client = await connect();
  try {
    await bus.start();
    // Both of the reader's connections, whose last statement is the read (a read of no lanes, or the loop's
    // first read on an empty log, which one connection would have seen without the warm-up).
    const readers = async () =>
      (await client.query<{ query: string }>('select query from pg_stat_activity where application_name = $1', [`tidings-reader:${schema}`])).rows.filter(
        (row) => /^with groups as/.test(row.query),
      ).length;
    await waitFor("the reader's two connections, each with the read planned", async () => (await readers()) === 2, 5_000);
  } finally {
    await bus.stop();
    await client.end();
  }
});
