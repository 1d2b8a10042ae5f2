/**
 * `npm run bench` -- Tidings beside pg-boss, graphile-worker and BullMQ, and the raw PostgreSQL floor,
 * on this machine, in one run (issue 8). Every system runs in its own child process; systems alternate
 * within each workload (A B C, A B C ...) for several rounds, and the report gives median, min-max and
 * each system's ratio to Tidings.
 *
 *   npm run bench                  full run: 3 rounds, ~15-20 minutes
 *   npm run bench -- --quick       smoke check, 1 round, ~2 minutes (fails only on errors)
 *   options: --rounds N, --sync-off (database bench_async, synchronous_commit off),
 *            --only drain,e2e (workloads), --systems tidings,pgboss (systems), --no-write
 */
import { execFileSync, spawn } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Redis } from 'ioredis';
import pg from 'pg';
import { FULL, QUICK, steps, taskFor, WORKLOAD_TITLES, type Row, type Sizes } from './lib/plan.ts';
import { checkTargets, fmt, latencyChart, renderTables, renderTargets, summarise, throughputChart, type Entry } from './lib/report.ts';
import { RESULT_MARK, type ChildResult, type Task, type Workload } from './lib/types.ts';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const SERVER = 'postgres://postgres@127.0.0.1:5432';
/** The build of src/ as it was when the run began: every round measures the same code even if src/ changes meanwhile. */
const snapshot = join(here, '.snapshot', String(process.pid));

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    rounds: { type: 'string' },
    'sync-off': { type: 'boolean', default: false },
    only: { type: 'string' },
    systems: { type: 'string' },
    'no-write': { type: 'boolean', default: false },
  },
});

const quick = args.quick === true;
const sizes: Sizes = { ...(quick ? QUICK : FULL) };
if (args.rounds !== undefined) sizes.rounds = Math.max(1, Number(args.rounds));
const syncOff = args['sync-off'] === true;
const database = syncOff ? 'bench_async' : 'bench';
const db = { url: `${SERVER}/${database}`, name: database };
const onlyWorkloads = args.only?.split(',').map((s) => s.trim());
const onlySystems = args.systems?.split(',').map((s) => s.trim());

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

// ---- servers --------------------------------------------------------------------------------------

/** Creates the benchmark databases if missing (idempotent), so a fresh machine needs nothing else. */
async function prepareDatabases(): Promise<void> {
  const admin = new pg.Client({ connectionString: `${SERVER}/postgres` });
  await admin.connect();
  try {
    for (const [name, asyncCommit] of [
      ['bench', false],
      ['bench_async', true],
    ] as const) {
      if (name === 'bench_async' && !syncOff) continue;
      const { rowCount } = await admin.query('select 1 from pg_database where datname = $1', [name]);
      if (rowCount === 0) await admin.query(`create database ${name}`);
      if (asyncCommit) await admin.query(`alter database ${name} set synchronous_commit = off`);
    }
  } finally {
    await admin.end();
  }
}

/**
 * One benchmark at a time on a machine: two runs would drop each other's schemas and queues. The lock is
 * a PostgreSQL advisory lock held by a session open for the whole run (released if this process dies).
 */
const LOCK_KEY = 0x7469_6469; // 'tidi'
async function lockMachine(): Promise<pg.Client> {
  const session = new pg.Client({ connectionString: `${SERVER}/postgres`, application_name: 'tidings-bench-lock' });
  session.on('error', () => undefined);
  await session.connect();
  const { rows } = await session.query<{ ok: boolean }>('select pg_try_advisory_lock($1) as ok', [LOCK_KEY]);
  if (rows[0]?.ok !== true) {
    log('Another benchmark run holds the lock on this machine; waiting for it to finish...');
    await session.query('select pg_advisory_lock($1)', [LOCK_KEY]);
  }
  return session;
}

/** Removes what an interrupted earlier run left in Redis under the harness's prefix. */
async function cleanRedis(): Promise<void> {
  const redis = new Redis({ host: '127.0.0.1', port: 6379, lazyConnect: true, maxRetriesPerRequest: 1 });
  try {
    await redis.connect();
    let cursor = '0';
    do {
      const [next, keys] = await redis.scan(cursor, 'MATCH', 'tbench:*', 'COUNT', 1000);
      cursor = next;
      if (keys.length > 0) await redis.del(...keys);
    } while (cursor !== '0');
  } finally {
    redis.disconnect();
  }
}

function version(pkg: string): string {
  try {
    return (JSON.parse(readFileSync(join(root, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'not installed';
  }
}

async function environment(): Promise<Record<string, unknown>> {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  const model = /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1]?.trim() ?? 'unknown';
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  const setting = async (name: string) => (await client.query<{ v: string }>(`select current_setting($1) as v`, [name])).rows[0]?.v;
  const pgInfo = {
    version: await setting('server_version'),
    synchronous_commit: await setting('synchronous_commit'),
    shared_buffers: await setting('shared_buffers'),
    fsync: await setting('fsync'),
    database,
  };
  await client.end();
  const redis = new Redis({ host: '127.0.0.1', port: 6379 });
  const info = await redis.info('server');
  const persistence = await redis.info('persistence');
  const save = (await redis.config('GET', 'save')) as string[];
  redis.disconnect();
  let commit = 'unknown';
  try {
    commit = readFileSync(join(root, '.git', 'HEAD'), 'utf8').trim();
    if (commit.startsWith('ref: ')) commit = readFileSync(join(root, '.git', commit.slice(5)), 'utf8').trim();
  } catch {
    // not a git checkout
  }
  let srcChanges: string[] = [];
  try {
    srcChanges = execFileSync('git', ['status', '--porcelain', '--', 'src'], { cwd: root, encoding: 'utf8' }).split('\n').filter(Boolean);
  } catch {
    // git unavailable
  }
  return {
    date: new Date().toISOString(),
    cpu: { model, count: cpus().length },
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    node: process.version,
    postgres: pgInfo,
    redis: {
      version: /redis_version:(\S+)/.exec(info)?.[1],
      save: save[1] ?? '',
      aof: /aof_enabled:(\d)/.exec(persistence)?.[1] === '1',
    },
    versions: {
      tidings: (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version,
      'pg-boss': version('pg-boss'),
      'graphile-worker': version('graphile-worker'),
      bullmq: version('bullmq'),
      ioredis: version('ioredis'),
      pg: version('pg'),
    },
    commit,
    /** Uncommitted changes under src/ when the run started: the figures are of that working tree. */
    srcChanges,
    mode: quick ? 'quick' : 'full',
    rounds: sizes.rounds,
    sizes,
  };
}

/** Compiles src/ the way `npm run build` does, into the snapshot: what users run, without tsx's transform. */
function buildSnapshot(): void {
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json'), '--outDir', snapshot, '--declaration', 'false', '--sourceMap', 'false'], {
    cwd: root,
    stdio: 'inherit',
  });
  cpSync(join(root, 'src', 'postgres', 'migrations'), join(snapshot, 'postgres', 'migrations'), { recursive: true });
}

// ---- children -------------------------------------------------------------------------------------

function runTask(task: Task): Promise<ChildResult> {
  const file = join(here, 'systems', `${task.system}.ts`);
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', file, JSON.stringify(task)], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NODE_NO_WARNINGS: '1', TIDINGS_BUILD: snapshot },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr = (stderr + chunk.toString()).slice(-8_000);
    });
    const killer = setTimeout(() => child.kill('SIGKILL'), task.timeoutMs + 20_000);
    child.on('close', (code, signal) => {
      clearTimeout(killer);
      const line = stdout.split('\n').find((l) => l.startsWith(RESULT_MARK));
      if (line !== undefined) {
        const result = JSON.parse(line.slice(RESULT_MARK.length)) as ChildResult;
        if (!result.ok && stderr.trim() !== '') result.error = `${result.error ?? ''}\n--- stderr ---\n${stderr.trim()}`;
        resolve(result);
        return;
      }
      resolve({ ok: false, error: `child exited with ${code ?? signal} and no result\n${stderr.trim()}`, metrics: {} });
    });
  });
}

/** Share of the machine's CPU busy over `ms` before a task: other work on this shared machine. */
async function backgroundLoad(ms: number): Promise<number> {
  const ticks = () => {
    const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    const total = fields.reduce((a, b) => a + b, 0);
    return { busy: total - (fields[3] ?? 0) - (fields[4] ?? 0), total };
  };
  const a = ticks();
  await new Promise((resolve) => setTimeout(resolve, ms));
  const b = ticks();
  return (100 * (b.busy - a.busy)) / Math.max(1, b.total - a.total);
}

function headline(workload: Workload, result: ChildResult): string {
  if (!result.ok) return `FAILED: ${(result.error ?? '').split('\n')[0]}`;
  const m = result.metrics;
  if (workload === 'raw') return `multi-row ${fmt(m.insertMulti)}/s, 10 conns ${fmt(m.single10)}/s, notify p50 ${fmt(m.notifyP50)} ms`;
  if (workload === 'latency') {
    const rates = Object.keys(m)
      .filter((k) => k.startsWith('p50@'))
      .map((k) => k.slice(4));
    const parts = rates.map((r) => `@${r}/s p50 ${fmt(m[`p50@${r}`])} p99 ${fmt(m[`p99@${r}`])} ms cpu ${fmt(m[`cpu@${r}`], 0)}%`);
    if (m.idleQueries !== undefined) parts.push(`idle ${fmt(m.idleQueries)} q/s`);
    return parts.join(', ');
  }
  if (workload === 'login')
    return `replica p50 ${fmt(m.replicaP50, 3)} p99 ${fmt(m.replicaP99, 3)} ms, HTTP p50 ${fmt(m.httpP50, 3)} p99 ${fmt(m.httpP99, 3)} ms`;
  if (workload === 'drift') {
    const checks = Object.keys(m)
      .filter((k) => k.startsWith('ms@'))
      .map((k) => k.slice(3));
    return checks.map((d) => `${d} diff ${fmt(m[`ms@${d}`], 0)} ms ${fmt(m[`messages@${d}`], 0)} msgs`).join(', ');
  }
  return `${fmt(m.rate)} events/s`;
}

// ---- main -----------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const started = Date.now();
  const lock = await lockMachine();
  try {
    await run(started);
  } finally {
    await lock.end().catch(() => undefined);
  }
}

async function run(started: number): Promise<void> {
  await prepareDatabases();
  await cleanRedis();
  const env = await environment();
  // Snapshots left by runs that were killed (only one run holds the lock, so none is in use).
  rmSync(join(here, '.snapshot'), { recursive: true, force: true });
  buildSnapshot();
  log(
    `Tidings benchmark (${quick ? 'quick' : 'full'}, ${sizes.rounds} round${sizes.rounds > 1 ? 's' : ''}), database ${database} (synchronous_commit ${String((env.postgres as { synchronous_commit: string }).synchronous_commit)})`,
  );

  const plan = steps(quick)
    .filter((step) => onlyWorkloads === undefined || onlyWorkloads.includes(step.workload))
    .map((step) => ({ ...step, rows: step.rows.filter((row) => onlySystems === undefined || onlySystems.includes(row.system)) }))
    .filter((step) => step.rows.length > 0);
  const results = new Map<string, { workload: Workload; row: Row; runs: ChildResult[] }>();
  for (let round = 1; round <= sizes.rounds; round++) {
    log(`\n== round ${round} of ${sizes.rounds} ==`);
    for (const step of plan) {
      for (const row of step.rows) {
        const task = taskFor(row, step.workload, sizes, db, quick);
        const background = await backgroundLoad(300);
        const t0 = Date.now();
        const result = await runTask(task);
        result.metrics.backgroundCpu = background;
        if (task.events > 0 && result.ok) result.metrics.events ??= task.events;
        if (task.publishSeconds > 0 && result.ok) result.metrics.publishSeconds = task.publishSeconds;
        const key = `${step.workload}|${row.label}`;
        const slot = results.get(key) ?? { workload: step.workload, row, runs: [] };
        slot.runs.push(result);
        results.set(key, slot);
        log(
          `  ${step.workload.padEnd(10)} ${row.label.padEnd(44)} ${headline(step.workload, result)}  (${((Date.now() - t0) / 1000).toFixed(1)} s${background > 25 ? `, machine ${background.toFixed(0)} % busy before` : ''})`,
        );
      }
    }
  }

  const entries: Entry[] = [...results.values()].map((r) => summarise(r.workload, r.row, r.runs));
  const cpu = env.cpu as { model: string; count: number };
  const pgInfo = env.postgres as { version: string; synchronous_commit: string };
  const versions = env.versions as Record<string, string>;
  const subtitle = `${cpu.count} x ${cpu.model}, Node ${process.version}, PostgreSQL ${pgInfo.version} (synchronous_commit ${pgInfo.synchronous_commit}), ${String(env.date).slice(0, 10)}; ${sizes.rounds} round(s)`;
  const tidingsLabel = 'Tidings';
  const keyedLabel = 'Tidings, 1k keys, inbox, no-op';
  const targets = checkTargets(entries, tidingsLabel, keyedLabel);

  const text = [
    `# Tidings benchmark -- ${String(env.date).slice(0, 19)}Z`,
    '',
    `Machine: ${cpu.count} x ${cpu.model}, ${String(env.memoryGiB)} GiB, kernel ${String(env.kernel)}; Node ${process.version}.`,
    `PostgreSQL ${pgInfo.version}, database ${database}, synchronous_commit ${pgInfo.synchronous_commit}; Redis ${String((env.redis as { version: string }).version)} (BullMQ: not durable unless Redis persists).`,
    `Versions: tidings ${versions.tidings}, pg-boss ${versions['pg-boss']}, graphile-worker ${versions['graphile-worker']}, bullmq ${versions.bullmq} (ioredis ${versions.ioredis}), pg ${versions.pg}.`,
    `${quick ? 'Quick mode (smaller sizes, 1 round): a smoke check, not figures to quote.' : `${sizes.rounds} rounds, systems alternating within each workload; median and min-max of the rounds.`}`,
    'Events ~250 B JSON. "x Tidings" = median / Tidings median of the same table (throughput: higher is better; latency: lower is better).',
    renderTables(entries),
    '\n### Targets of issue 8 (reported, not asserted)\n',
    renderTargets(targets),
    '',
    `Total time: ${((Date.now() - started) / 1000).toFixed(0)} s.`,
  ].join('\n');
  process.stdout.write(`${text}\n`);

  const failed = entries.flatMap((e) => e.runs.filter((r) => !r.ok).map((r) => ({ workload: e.workload, label: e.row.label, error: r.error })));
  if (args['no-write'] !== true) {
    const dir = join(here, 'results');
    mkdirSync(dir, { recursive: true });
    const json = {
      environment: env,
      workloads: WORKLOAD_TITLES,
      notes: [
        'Throughput is counted to acknowledgement: Tidings cursors, pg-boss completed state, graphile-worker jobs deleted, BullMQ jobs no longer pending.',
        'Peers in workload 3 enqueue inside an explicit transaction (pg-boss send with { db }, graphile-worker add_job SQL); BullMQ has no transaction, its workloads 3 and 4 are the same add().',
        'Guarantee rows of peers write the effect on a separate connection (not atomic with the acknowledgement) and have no per-key order.',
        'backgroundCpu: % of the machine busy during the 0.3 s before each task (another user of this shared machine); high values mean that run was disturbed.',
        'CPU: node+server = this child process + PostgreSQL processes of the benchmark database and background writers (or redis-server), as % of all cores; machine = /proc/stat, includes anything else running.',
      ],
      results: entries.map((e) => ({
        workload: e.workload,
        label: e.row.label,
        system: e.row.system,
        group: e.row.group,
        variant: e.row.variant,
        summary: e.summary,
        runs: e.runs.map((r) => (r.ok ? r.metrics : { error: r.error })),
        series: e.series,
      })),
      targets,
      failed,
      report: text,
    };
    // A quick run is a smoke check: it must not replace the committed figures of a full run.
    const base = quick ? 'quick' : 'latest';
    writeFileSync(join(dir, `${base}.json`), `${JSON.stringify(json, null, 2)}\n`);
    writeFileSync(join(dir, `${base}.md`), `${text}\n`);
    writeFileSync(join(dir, `${base}-throughput.svg`), await throughputChart(entries, subtitle));
    writeFileSync(join(dir, `${base}-latency.svg`), await latencyChart(entries, subtitle));
    log(`\nWrote bench/results/${base}.json, ${base}.md, ${base}-throughput.svg, ${base}-latency.svg`);
  }
  if (failed.length > 0) {
    log(`\n${failed.length} run(s) failed:`);
    for (const f of failed) log(`- ${f.workload} / ${f.label}: ${f.error ?? ''}`);
    process.exitCode = 1;
  }
}

main()
  .catch((error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  })
  .finally(() => rmSync(snapshot, { recursive: true, force: true }));
