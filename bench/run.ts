/**
 * `npm run bench` -- Tidings beside pg-boss, graphile-worker and BullMQ, and the raw PostgreSQL floor,
 * on this machine, in one run (issue 8). Every system runs in its own child process; systems alternate
 * within each workload (A B C, A B C ...) for several rounds, and the report gives median, min-max and
 * each system's ratio to Tidings.
 *
 *   npm run bench                  the full run: 2 rounds (scaling, issue 21's rows, brokers, replicas once), ~40 minutes
 *   npm run bench -- --quick       a quick look: 1 round, small sizes, every row
 *   npm run bench -- --smoke       smoke check (CI runs it): --quick's sizes, one row per system and workload; fails only on errors
 *   options: --rounds N, --sync-off (database bench_async, synchronous_commit off),
 *            --only drain,e2e (workloads, or row groups: --only tracing), --systems tidings,pgboss (systems),
 *            --rows 'steady;1k keys' (label substrings, ';' between: labels have commas; a closing $ matches a label's end), --no-write,
 *            --stop-after <minutes> (start no task after that; report what ran), --out <name> (results/<name>.*)
 */
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { latencyChart, throughputChart } from './harness/charts.ts';
import { buildSnapshot, environment } from './harness/environment.ts';
import { FULL, QUICK, type Sizes, steps, taskFor, WORKLOAD_TITLES } from './harness/plan.ts';
import { type Entry, headline, renderTables, summarise } from './harness/report.ts';
import type { Row } from './harness/rows.ts';
import { cleanRedis, lockMachine, prepareDatabases, SERVER } from './harness/servers.ts';
import { backgroundLoad, runTask } from './harness/spawn.ts';
import { checkTargets, renderTargets } from './harness/targets.ts';
import type { ChildResult, Workload } from './protocol.ts';

const here = dirname(fileURLToPath(import.meta.url));
/** The build of src/ as it was when the run began: every round measures the same code even if src/ changes meanwhile. */
const snapshot = join(here, '.snapshot', String(process.pid));

const { values: args } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    smoke: { type: 'boolean', default: false },
    rounds: { type: 'string' },
    'sync-off': { type: 'boolean', default: false },
    only: { type: 'string' },
    systems: { type: 'string' },
    rows: { type: 'string' },
    'no-write': { type: 'boolean', default: false },
    'stop-after': { type: 'string' },
    out: { type: 'string' },
  },
});

/** `--smoke`: every system's path through every workload once (the first of its rows), nothing measured closely. */
const smoke = args.smoke === true;
const quick = args.quick === true || smoke;
const sizes: Sizes = { ...(quick ? QUICK : FULL) };
if (args.rounds !== undefined) sizes.rounds = Math.max(1, Number(args.rounds));
const syncOff = args['sync-off'] === true;
const database = syncOff ? 'bench_async' : 'bench';
const db = { url: `${SERVER}/${database}`, name: database };
const onlyWorkloads = args.only?.split(',').map((s) => s.trim());
const onlySystems = args.systems?.split(',').map((s) => s.trim());
/**
 * `--rows 'a;b'`: only rows whose label contains one of these (case-insensitive), or ends with one written
 * with a closing `$` (`'(1 process)$'`, not its RLS twin): one table row, alternated with another build.
 */
const onlyRows = args.rows?.split(';').map((s) => s.trim().toLowerCase());

function labelMatches(label: string, part: string): boolean {
  return part.endsWith('$') ? label.endsWith(part.slice(0, -1)) : label.includes(part);
}

/**
 * A run cut short (`--stop-after <minutes>`, or SIGINT / SIGTERM) finishes the task that runs, starts no
 * other, and reports what ran: a long run on a shared machine still leaves its figures.
 */
const stopAfterMs = args['stop-after'] === undefined ? Number.POSITIVE_INFINITY : Number(args['stop-after']) * 60_000;
let stopRequested = false;
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    stopRequested = true;
    log(`\n${signal}: stopping after the task that runs; the report covers what ran.`);
  });
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

/** The rows that took longest, all rounds together (each task's wall time, start and watchdog included): where a run's time goes. */
function longestRows(entries: Entry[], count = 12): string {
  const rows = entries
    .map((e) => ({ name: `${e.workload} / ${e.row.label}`, runs: e.runs.length, seconds: e.runs.reduce((sum, r) => sum + (r.metrics.taskSeconds ?? 0), 0) }))
    .sort((a, b) => b.seconds - a.seconds)
    .slice(0, count);
  return `\nLongest rows (seconds, all rounds): ${rows.map((r) => `${r.name} ${r.seconds.toFixed(0)} s${r.runs > 1 ? ` (${r.runs} runs)` : ''}`).join('; ')}.`;
}

async function main(): Promise<void> {
  const lock = await lockMachine();
  // Timed from the lock on: the total time and --stop-after leave out a wait for another run to finish.
  const started = Date.now();
  try {
    await run(started);
  } finally {
    await lock.end().catch(() => undefined);
  }
}

async function run(started: number): Promise<void> {
  await prepareDatabases(syncOff);
  await cleanRedis();
  const env = await environment({ db, quick, sizes });
  // Snapshots left by runs that were killed (only one run holds the lock, so none is in use).
  rmSync(join(here, '.snapshot'), { recursive: true, force: true });
  buildSnapshot(snapshot);
  log(
    `Tidings benchmark (${smoke ? 'smoke' : quick ? 'quick' : 'full'}, ${sizes.rounds} round${sizes.rounds > 1 ? 's' : ''}), database ${database} (synchronous_commit ${String((env.postgres as { synchronous_commit: string }).synchronous_commit)})`,
  );

  // --only names workloads, or groups of rows (`--only tracing`: issue 22's rows of every workload).
  const plan = steps(quick, sizes)
    .map((step) => ({
      ...step,
      rows: step.rows.filter(
        (row) =>
          (onlyWorkloads === undefined || onlyWorkloads.includes(step.workload) || onlyWorkloads.includes(row.group)) &&
          (onlySystems === undefined || onlySystems.includes(row.system)) &&
          (onlyRows === undefined || onlyRows.some((part) => labelMatches(row.label.toLowerCase(), part))),
      ),
    }))
    .filter((step) => step.rows.length > 0);
  if (smoke) {
    const seen = new Set<string>();
    for (const step of plan) step.rows = step.rows.filter((row) => !seen.has(`${step.workload}/${row.system}`) && seen.add(`${step.workload}/${row.system}`));
  }
  const results = new Map<string, { workload: Workload; row: Row; runs: ChildResult[] }>();
  let cutShort = false;
  rounds: for (let round = 1; round <= sizes.rounds; round++) {
    log(`\n== round ${round} of ${sizes.rounds} ==`);
    for (const step of plan) {
      if (step.once === true && round > 1) continue;
      for (const row of step.rows) {
        if (stopRequested || Date.now() - started > stopAfterMs) {
          cutShort = true;
          break rounds;
        }
        const task = taskFor(row, step.workload, sizes, db, quick, round);
        // A smoke run measures nothing closely: it spares the 0.3 s sample.
        const background = smoke ? Number.NaN : await backgroundLoad(300);
        const t0 = Date.now();
        const result = await runTask(task, snapshot);
        const seconds = (Date.now() - t0) / 1000;
        result.metrics.backgroundCpu = background;
        result.metrics.taskSeconds = seconds;
        if (task.events > 0 && result.ok) result.metrics.events ??= task.events;
        if (task.publishSeconds > 0 && result.ok) result.metrics.publishSeconds = task.publishSeconds;
        const key = `${step.workload}|${row.label}`;
        const slot = results.get(key) ?? { workload: step.workload, row, runs: [] };
        slot.runs.push(result);
        results.set(key, slot);
        log(
          `  ${step.workload.padEnd(10)} ${row.label.padEnd(44)} ${headline(step.workload, result)}  (${seconds.toFixed(1)} s${background > 25 ? `, machine ${background.toFixed(0)} % busy before` : ''})`,
        );
      }
    }
  }

  const entries: Entry[] = [...results.values()].map((r) => summarise(r.workload, r.row, r.runs));
  const cpu = env.cpu as { model: string; count: number };
  const pgInfo = env.postgres as { version: string; synchronous_commit: string };
  const versions = env.versions as Record<string, string>;
  const subtitle = `${cpu.count} x ${cpu.model}, Node ${process.version}, PostgreSQL ${pgInfo.version} (synchronous_commit ${pgInfo.synchronous_commit}), ${String(env.date).slice(0, 10)}; ${sizes.rounds} round(s)`;
  const targets = checkTargets(entries);

  const text = [
    `# Tidings benchmark -- ${String(env.date).slice(0, 19)}Z`,
    '',
    `Machine: ${cpu.count} x ${cpu.model}, ${String(env.memoryGiB)} GiB, kernel ${String(env.kernel)}; Node ${process.version}.`,
    `PostgreSQL ${pgInfo.version}, database ${database}, synchronous_commit ${pgInfo.synchronous_commit}; Redis ${String((env.redis as { version: string }).version)} (BullMQ: not durable unless Redis persists).`,
    `Versions: tidings ${versions.tidings}, pg-boss ${versions['pg-boss']}, graphile-worker ${versions['graphile-worker']}, bullmq ${versions.bullmq} (ioredis ${versions.ioredis}), pg ${versions.pg}.`,
    `${quick ? 'Quick mode (smaller sizes, 1 round): a smoke check, not figures to quote.' : `${sizes.rounds} rounds, systems alternating within each workload; median and min-max of the rounds.`}`,
    'Events ~250 B JSON. "x Tidings" = median / Tidings median of the same table (throughput: higher is better; latency: lower is better).',
    renderTables(entries),
    '\n### Goals of issue 24, as ratios of this run (reported, never asserted)\n',
    renderTargets(targets),
    '',
    `Total time: ${((Date.now() - started) / 1000).toFixed(0)} s.${cutShort ? ' Cut short (--stop-after or a signal): the rows after the last one shown did not run.' : ''}`,
    longestRows(entries),
  ].join('\n');
  process.stdout.write(`${text}\n`);

  const failed = entries.flatMap((e) => e.runs.filter((r) => !r.ok).map((r) => ({ workload: e.workload, label: e.row.label, error: r.error })));
  if (args['no-write'] !== true) {
    const dir = join(here, 'results');
    mkdirSync(dir, { recursive: true });
    const json = {
      environment: { ...env, cutShort },
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
    // A quick run is a smoke check: it must not replace the committed figures of a full run; `--out` names
    // the files of a partial run (say the rows a cut-short run did not reach).
    const base = args.out ?? (quick ? 'quick' : 'latest');
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
