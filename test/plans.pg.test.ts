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
import { connect, DATABASE_URL, dropSchema, requirePostgres, uniqueSchema } from './helpers.ts';

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

function nodes(plan: PlanNode): PlanNode[] {
  return [plan, ...(plan.Plans ?? []).flatMap(nodes)];
}

test("the generic plan of the consumer's read opens a window on a log of 200,000 without scanning it: through the xid index, or from the window's floor in position order", async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('plan');
  schemas.push(schema);
  const bus = createBus({ service: 'plans', backbone: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined }) });
  await bus.transaction(async () => undefined); // creates the schema
  await bus.stop();
  const client = await connect();
  try {
    const fill = (from: number, to: number) =>
      client.query(
        `insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         select $1, 'm' || g, $1, 'tidings://plans', now(), 'k' || (g % 100), g % 100, 'm' || g, jsonb_build_object('key', 'k' || (g % 100), 'seq', g)
         from generate_series($2::int, $3::int) g`,
        [Ticked.topic, from, to],
      );
    // A `done` taken before them with its floor, as the consumer's read takes a window (migration 016).
    const { rows: taken } = await client.query<{ done: string; last: string; next_xid: string }>(
      `select snap::text as done, last, (pg_snapshot_xmax(snap)::text::int8 + age(pg_snapshot_xmax(snap)::xid))::text as next_xid
       from (select pg_current_snapshot() as snap, coalesce(pg_sequence_last_value('${schema}.log_position_seq'::regclass), 0) as last offset 0) taken`,
    );
    const before = taken[0]!;
    // 200,000 messages from 10,000 transactions (as a live log has: few messages per transaction).
    await client.query('set synchronous_commit = off');
    await client.query(
      `do $$ begin for t in 0..9999 loop
         insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         select '${Ticked.topic}', 'm' || g, '${Ticked.topic}', 'tidings://plans', now(), 'k' || (g % 100), g % 100, 'm' || g, jsonb_build_object('key', 'k' || (g % 100), 'seq', g)
         from generate_series(t * 20 + 1, t * 20 + 20) g;
         commit;
       end loop; end $$`,
    );
    // `done`: a snapshot taken after those, so the window holds only the 10 published next.
    const { rows } = await client.query<{ done: string }>('select pg_current_snapshot()::text as done');
    const done = rows[0]!.done;
    await fill(200_001, 200_010);
    await client.query(`analyze ${schema}.log`);
    await client.query('set plan_cache_mode = force_generic_plan');
    await client.query(
      `prepare read(text[], text[], text[], int8[], text[], int, int, int8[], int8[], int8[], text[], text) as ${statements(schema).readLanes(true, false)}`,
    );
    // `done`'s floor unknown (a cursor of a version before migration 016): the window's transactions are found by xid.
    const explained = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(
      `explain (analyze, format json) execute read('{"{0,1,2,3}"}', '{"${done}"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{NULL}', '{NULL}', 'plans')`,
    );
    const all = nodes(explained.rows[0]!['QUERY PLAN'][0]!.Plan);
    const onLog = all.filter((node) => node['Relation Name'] === 'log');
    t.diagnostic(JSON.stringify(onLog.map((node) => `${node['Node Type']} ${node['Index Name'] ?? ''} removed ${node['Rows Removed by Filter'] ?? 0}`)));
    assert.ok(!onLog.some((node) => node['Node Type'] === 'Seq Scan'), 'no sequential scan of the log');
    assert.ok(
      all.some((node) => node['Index Name'] === 'log_xid'),
      'the xid index finds the window',
    );
    const examined = onLog.reduce((sum, node) => sum + (node['Rows Removed by Filter'] ?? 0), 0);
    assert.ok(examined < 100, `rows read and thrown away: ${examined}`);
    const returned = all.find((node) => node['Node Type'] === 'Limit') as (PlanNode & { 'Actual Rows'?: number }) | undefined;
    assert.equal(returned?.['Actual Rows'], 10, 'the window holds the 10 messages committed after done');

    // From the `done` before them, with its floor: a window of 200,010 messages whose first read takes 500 of
    // them from the floor on, in position order, and reads little more (no sort of the window).
    const backlog = await client.query<{ 'QUERY PLAN': Array<{ Plan: PlanNode }> }>(
      `explain (analyze, format json) execute read('{"{0,1,2,3}"}', '{"${before.done}"}', '{NULL}', '{NULL}', '{${Ticked.topic}}', 4, 500, '{NULL}', '{500}', '{${before.last}}', '{${before.next_xid}}', 'plans')`,
    );
    const backlogPlan = nodes(backlog.rows[0]!['QUERY PLAN'][0]!.Plan) as Array<PlanNode & { 'Actual Rows'?: number; 'Actual Loops'?: number }>;
    const backlogLog = backlogPlan.filter((node) => node['Relation Name'] === 'log');
    t.diagnostic(
      JSON.stringify(
        backlogLog.map((node) => `${node['Node Type']} ${node['Index Name'] ?? ''} rows ${node['Actual Rows']} removed ${node['Rows Removed by Filter'] ?? 0}`),
      ),
    );
    assert.ok(!backlogLog.some((node) => node['Node Type'] === 'Seq Scan'), 'no sequential scan of the log');
    assert.ok(!backlogPlan.some((node) => node['Node Type'] === 'Sort'), 'no sort of the window');
    const read = backlogLog.reduce((sum, node) => sum + (node['Actual Rows'] ?? 0) * (node['Actual Loops'] ?? 1) + (node['Rows Removed by Filter'] ?? 0), 0);
    assert.ok(read < 2_000, `log rows read for a batch of 500: ${read}`);
    const first = backlogPlan.find((node) => node['Node Type'] === 'Limit');
    assert.equal(first?.['Actual Rows'], 500, 'a full batch');
  } finally {
    await client.end();
  }
});

test("the consumer's read runs where the generic plan is forced; the pool's connections (users' transactions) keep PostgreSQL's default", async (t) => {
  if (!(await requirePostgres(t))) return;
  const driver = await pgDriver({ url: DATABASE_URL, poolSize: 2, name: 'plans' });
  try {
    const mode = "select current_setting('plan_cache_mode') as mode";
    const read = await driver.planned<{ mode: string }>('tidings.test.plan-mode', mode, []);
    assert.equal(read.rows[0]!.mode, 'force_generic_plan');
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
