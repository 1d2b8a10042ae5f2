/** Aggregates the runs into medians and ranges and prints the tables (targets: targets.ts; charts: charts.ts). */
import type { ChildResult, LatencySeries, Workload } from '../protocol.ts';
import { BROKER_TITLES, isBrokerGroup } from './brokers.ts';
import { WORKLOAD_TITLES } from './plan.ts';
import type { Row } from './rows.ts';

export interface Summary {
  median: number;
  min: number;
  max: number;
  n: number;
}

export interface Entry {
  workload: Workload;
  row: Row;
  runs: ChildResult[];
  summary: Record<string, Summary>;
  /** Latency distribution of the run with the median p50 at each rate. */
  series?: LatencySeries[];
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

export function summarise(workload: Workload, row: Row, runs: ChildResult[]): Entry {
  const ok = runs.filter((run) => run.ok);
  const names = new Set(ok.flatMap((run) => Object.keys(run.metrics)));
  const summary: Record<string, Summary> = {};
  for (const name of names) {
    const values = ok.map((run) => run.metrics[name]).filter((v): v is number => typeof v === 'number' && Number.isFinite(v));
    if (values.length === 0) continue;
    summary[name] = { median: median(values), min: Math.min(...values), max: Math.max(...values), n: values.length };
  }
  const entry: Entry = { workload, row, runs, summary };
  if (workload === 'latency') {
    const series: LatencySeries[] = [];
    const rates = new Set(ok.flatMap((run) => (run.series ?? []).map((s) => s.rate)));
    for (const rate of rates) {
      const target = summary[`p50@${rate}`]?.median;
      const candidates = ok.filter((run) => run.metrics[`p50@${rate}`] !== undefined);
      candidates.sort((a, b) => Math.abs(a.metrics[`p50@${rate}`]! - target!) - Math.abs(b.metrics[`p50@${rate}`]! - target!));
      const pick = candidates[0]?.series?.find((s) => s.rate === rate);
      if (pick !== undefined) series.push(pick);
    }
    entry.series = series;
  }
  return entry;
}

// ---- formatting -----------------------------------------------------------------------------------

export function fmt(value: number | undefined, digits?: number): string {
  if (value === undefined || !Number.isFinite(value)) return '-';
  const d = digits ?? (Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2);
  return value.toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d });
}

function range(s: Summary | undefined, digits?: number): string {
  if (s === undefined) return '-';
  if (s.n === 1) return '';
  return `${fmt(s.min, digits)}-${fmt(s.max, digits)}`;
}

function ratio(value: number | undefined, reference: number | undefined): string {
  if (value === undefined || reference === undefined || reference === 0) return '-';
  return `${(value / reference).toFixed(2)}x`;
}

/** A Markdown table; the first `left` columns are text (left-aligned), the others figures. */
export function table(header: string[], rows: string[][], left = 1): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => (i < left ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  const rule = widths.map((w, i) => (i < left ? ` ${'-'.repeat(w)} ` : ` ${'-'.repeat(w - 1)}: `)).join('|');
  return [line(header), `|${rule}|`, ...rows.map(line)].join('\n');
}

function groupsOf(entries: Entry[], workload: Workload): Entry[][] {
  const mine = entries.filter((e) => e.workload === workload);
  const groups = new Map<string, Entry[]>();
  for (const entry of mine) {
    const list = groups.get(entry.row.group) ?? [];
    list.push(entry);
    groups.set(entry.row.group, list);
  }
  return [...groups.values()];
}

const RAW_METRICS: Array<[string, string, string]> = [
  ['insertMulti', 'multi-row INSERT ... VALUES, 1,000 rows per statement', 'rows/s'],
  ['insertJson', "INSERT ... SELECT from one JSON array parameter, 1,000 rows (Tidings' small batches)", 'rows/s'],
  ['copy', "COPY ... FROM STDIN, 1,000 rows per COPY (Tidings' large publishMany)", 'rows/s'],
  ['single1', 'single-row autocommit INSERT, 1 connection', 'rows/s'],
  ['single10', 'single-row autocommit INSERT, 10 connections', 'rows/s'],
  ['tx10', 'BEGIN; INSERT; COMMIT (3 round trips), 10 connections', 'rows/s'],
  ['business10', 'BEGIN; INSERT business row; COMMIT, 10 connections (workload 3 with a business row, without the event)', 'tx/s'],
  ['single10notify', 'single-row INSERT + pg_notify in each, 10 connections', 'rows/s'],
  ['notifyP50', 'NOTIFY -> LISTEN round trip, p50', 'ms'],
  ['notifyP99', 'NOTIFY -> LISTEN round trip, p99', 'ms'],
];

/** What each kind of table adds to its workload's title. */
const GROUP_TITLES: Partial<Record<Row['group'], string>> = {
  twoProcess: ' -- producers and consumer in two processes (as two services run; the headline rows)',
  business: ' -- each transaction also inserts a business row; 2 processes',
  cold: ' -- cold start (a fresh process)',
  steady: ' -- steady state (after a warm-up in the same process)',
  guarantees: ' -- guarantees on (workload 6)',
  subscriptions: ' -- scaling: subscriptions that each receive every event (1k keys, inbox; 1 process)',
  payload: ' -- scaling: payload size (1k keys, inbox; 1 process)',
  tracing: ' -- the cost of traces and metrics (issue 22): off, no-op, every span sampled',
  tenancy: ' -- tenancy: 20 tenants, without and with row-level security (issue 23)',
  tenancyTx: ' -- tenancy: 20 tenants, handlers insert via ctx.tx, without and with row-level security (issue 23)',
};

/** The raw floor a throughput table's rows are divided by (same run): [raw metric, its name]. */
function floorOf(workload: Workload, group: Row['group']): [string, string] | undefined {
  if (workload === 'bulk') return ['copy', 'raw COPY'];
  // PostgreSQL's raw insert is no floor for a broker's drain: its rows compare with the plain client instead.
  if (workload === 'drain') return isBrokerGroup(group) ? undefined : ['insertJson', 'raw JSON-array INSERT'];
  if (workload === 'e2e' && group === 'business') return ['business10', 'raw business tx'];
  if ((workload === 'e2e' || workload === 'standalone') && (group === 'base' || group === 'twoProcess')) return ['single10', 'raw 1-row commits'];
  return undefined;
}

/** Tables of named figures (scaling and issue 21's rows): [metric, header, digits]. */
const FIGURE_TABLES: Partial<Record<Workload, Array<[string, string, number?]>>> = {
  backlog: [
    ['events', 'backlog', 0],
    ['rate', 'events/s (start -> all acked)'],
    ['steadyRate', 'events/s (first message -> all acked)'],
    ['firstMessageMs', 'ms to first message'],
    ['fillRate', 'fill, events/s (server-side INSERT, 1,000 per tx)'],
  ],
  scheduled: [
    ['deliveredRate', 'delivered/s (first due -> last handled)'],
    ['lateP50', 'lateness p50 ms'],
    ['lateP99', 'lateness p99 ms'],
    ['lateMax', 'lateness max ms'],
    ['early', 'early (must be 0)', 0],
    ['insertRate', 'scheduling, jobs/s'],
  ],
  request: [
    ['p50', 'round trip p50 ms'],
    ['p99', 'round trip p99 ms'],
    ['p999', 'p99.9 ms'],
    ['achieved', 'requests/s achieved'],
    ['cpu', 'CPU % (node+server)', 0],
  ],
  saga: [
    ['transitionRate', 'transitions/s'],
    ['sagaRate', 'sagas completed/s'],
    ['sagas', 'sagas', 0],
  ],
  fairness: [
    ['quietP50', 'quiet p50 ms'],
    ['quietP99', 'quiet p99 ms'],
    ['quietMax', 'quiet max ms'],
    ['quietPublishP99', 'quiet publish call p99 ms'],
    ['quietDeliveryP99', 'quiet delivery p99 ms'],
    ['quietSteadyDeliveryP99', 'quiet delivery p99 after 1 s ms'],
    ['quietEvents', 'quiet events', 0],
    ['noisyPublished', 'noisy published/s', 0],
    ['noisyHandled', 'noisy handled/s', 0],
    ['backlog', 'noisy backlog', 0],
  ],
};

/** The readable report: one table per workload (and per group), then the targets. */
export function renderTables(entries: Entry[]): string {
  const out: string[] = [];
  const rawFloor = entries.find((e) => e.workload === 'raw')?.summary;
  const workloads: Workload[] = [
    'raw',
    'bulk',
    'drain',
    'e2e',
    'standalone',
    'fanout',
    'latency',
    'backlog',
    'scheduled',
    'request',
    'saga',
    'fairness',
    'login',
    'drift',
  ];
  for (const workload of workloads) {
    for (const group of groupsOf(entries, workload)) {
      const first = group[0]!;
      const kind = first.row.group;
      const suffix = isBrokerGroup(kind)
        ? BROKER_TITLES[kind]
        : kind === 'base' && ['e2e', 'standalone', 'latency'].includes(workload)
          ? ' -- producers and consumer in one process'
          : (GROUP_TITLES[kind] ?? '');
      const events = first.summary.events?.median;
      const seconds = first.summary.publishSeconds?.median;
      const sizes = new Set(group.map((e) => e.summary.events?.median));
      const size =
        events === undefined || workload === 'raw' || first.row.group === 'replica' || sizes.size > 1 || FIGURE_TABLES[workload] !== undefined
          ? ''
          : workload === 'fanout'
            ? ` [${fmt(events, 0)} events x 10]`
            : seconds !== undefined
              ? ` [${seconds} s of publishing per run]`
              : ` [${fmt(events, 0)} events]`;
      out.push(`\n### ${WORKLOAD_TITLES[workload]}${suffix}${size}\n`);
      const reference = group.find((e) => e.row.reference);
      if (workload === 'raw') {
        const s = first.summary;
        out.push(
          table(
            ['Raw method (pg)', 'median', 'min-max', 'unit'],
            RAW_METRICS.map(([key, label, unit]) => [label, fmt(s[key]?.median), range(s[key]), unit]),
          ),
        );
      } else if (FIGURE_TABLES[workload] !== undefined) {
        const columns = FIGURE_TABLES[workload]!;
        out.push(
          table(
            ['System', ...columns.map(([, header]) => header)],
            group.map((e) => [e.row.label, ...columns.map(([key, , digits]) => fmt(e.summary[key]?.median, digits))]),
          ),
        );
      } else if (workload === 'login' || workload === 'drift') {
        out.push(renderReplica(workload, first.summary));
      } else if (workload === 'latency') {
        const rates = [
          ...new Set(
            group.flatMap((e) =>
              Object.keys(e.summary)
                .filter((k) => k.startsWith('p50@'))
                .map((k) => Number(k.slice(4))),
            ),
          ),
        ].sort((a, b) => a - b);
        const rows: string[][] = [];
        for (const rate of rates) {
          for (const e of group) {
            const s = e.summary;
            if (s[`p50@${rate}`] === undefined) continue;
            const ref = reference?.summary;
            // A system that cannot keep up builds a queue: its figures then measure the queue's growth.
            const notSustained = (s[`sustained@${rate}`]?.min ?? 1) < 1;
            rows.push([
              `${e.row.label} @ ${rate}/s${notSustained ? ' (!)' : ''}`,
              fmt(s[`p50@${rate}`]?.median),
              range(s[`p50@${rate}`]),
              fmt(s[`p99@${rate}`]?.median),
              range(s[`p99@${rate}`]),
              fmt(s[`p999@${rate}`]?.median),
              fmt(s[`max@${rate}`]?.median),
              fmt(s[`cpu@${rate}`]?.median, 0),
              fmt(s[`cpuMachine@${rate}`]?.median, 0),
              ratio(s[`p50@${rate}`]?.median, ref?.[`p50@${rate}`]?.median),
              ratio(s[`p99@${rate}`]?.median, ref?.[`p99@${rate}`]?.median),
            ]);
          }
        }
        out.push(
          table(
            [
              'System @ rate',
              'p50 ms',
              'p50 min-max',
              'p99 ms',
              'p99 min-max',
              'p99.9 ms',
              'max ms',
              'CPU % (node+server)',
              'CPU % machine',
              'p50 / Tidings',
              'p99 / Tidings',
            ],
            rows,
          ),
        );
        if (rows.some((r) => r[0]!.endsWith('(!)'))) {
          out.push(
            "\n(!) not sustained: the system could not keep up with the offered rate (calls below 95 % of it, or the last fifth's latency over twice the first's), so its figures measure a growing queue, not a message's way through.",
          );
        }
        const idle = group.filter((e) => e.summary.idleQueries !== undefined);
        if (idle.length > 0) {
          out.push('\nIdle cost, one consumer running, no traffic (PostgreSQL systems: queries counted in the client, and');
          out.push('transactions from pg_stat_database; BullMQ: Redis commands served):\n');
          out.push(
            table(
              ['System', 'queries/s idle', 'min-max', 'xacts/s (pg_stat_database)'],
              idle.map((e) => [e.row.label, fmt(e.summary.idleQueries?.median), range(e.summary.idleQueries), fmt(e.summary.idleXacts?.median)]),
            ),
          );
        }
      } else {
        const extra = workload === 'drain' ? 'steady (first message on)' : workload === 'bulk' ? '' : 'producer rate';
        const extraKey = workload === 'drain' ? 'steadyRate' : 'producerRate';
        const floor = floorOf(workload, kind);
        const floorValue = floor === undefined ? undefined : rawFloor?.[floor[0]]?.median;
        const header = ['System', 'events/s median', 'min-max', 'x Tidings'];
        if (floor !== undefined) header.push(`÷ ${floor[1]}`);
        if (extra !== '') header.push(`${extra} median`);
        const deliveries = group.some((e) => e.summary.deliveryRate !== undefined);
        if (deliveries) header.push('deliveries/s');
        const queries = group.some((e) => e.summary.queriesPerEvent !== undefined);
        if (queries) header.push('queries/event');
        // Workloads 3 and 4 publish for a time, and rows of one table may differ in size: each row's own number.
        const timed = group.some((e) => e.summary.publishSeconds !== undefined) || sizes.size > 1;
        if (timed) header.push('events median');
        out.push(
          table(
            header,
            group.map((e) => {
              const cells = [e.row.label, fmt(e.summary.rate?.median), range(e.summary.rate), ratio(e.summary.rate?.median, reference?.summary.rate?.median)];
              if (floor !== undefined) cells.push(ratio(e.summary.rate?.median, floorValue));
              if (extra !== '') cells.push(fmt(e.summary[extraKey]?.median));
              if (deliveries) cells.push(fmt(e.summary.deliveryRate?.median));
              if (queries) cells.push(fmt(e.summary.queriesPerEvent?.median));
              if (timed) cells.push(fmt(e.summary.events?.median, 0));
              return cells;
            }),
          ),
        );
      }
      const failures = group.flatMap((e) => e.runs.filter((r) => !r.ok).map((r) => `${e.row.label}: ${(r.error ?? '').split('\n')[0]}`));
      if (failures.length > 0) out.push(`\nFailed runs:\n${failures.map((f) => `- ${f}`).join('\n')}`);
    }
  }
  return out.join('\n');
}

/** Workload 9 (bench/tidings/replica.ts): the two login paths side by side; the drift check per number of differences. */
function renderReplica(workload: 'login' | 'drift', s: Record<string, Summary>): string {
  if (workload === 'login') {
    const paths: Array<[string, string]> = [
      ['replica', 'login, local replica (memory lookup) + scrypt'],
      ['http', 'login, HTTP call to identity + scrypt'],
      ['replicaLookup', 'data access only: replica lookup'],
      ['httpLookup', 'data access only: HTTP call (1 indexed query)'],
    ];
    return [
      `${fmt(s.logins?.median, 0)} logins per path, ${fmt(s.concurrency?.median, 0)} concurrent, ${fmt(s.users?.median, 0)} users; scrypt N = 1,024 in both; identity's node:http server in its own process.\n`,
      table(
        ['Path', 'p50 ms', 'p50 min-max', 'p99 ms', 'p99 min-max', 'p99.9 ms', 'max ms', 'per s', 'p50 / replica', 'p99 / replica'],
        paths.map(([key, label]) => {
          const ref = key.endsWith('Lookup') ? 'replicaLookup' : 'replica';
          return [
            label,
            fmt(s[`${key}P50`]?.median, 3),
            range(s[`${key}P50`], 3),
            fmt(s[`${key}P99`]?.median, 3),
            range(s[`${key}P99`], 3),
            fmt(s[`${key}P999`]?.median, 3),
            fmt(s[`${key}Max`]?.median),
            fmt(s[`${key}Rate`]?.median),
            ratio(s[`${key}P50`]?.median, s[`${ref}P50`]?.median),
            ratio(s[`${key}P99`]?.median, s[`${ref}P99`]?.median),
          ];
        }),
      ),
    ].join('\n');
  }
  const differences = Object.keys(s)
    .filter((k) => k.startsWith('ms@'))
    .map((k) => Number(k.slice(3)))
    .sort((a, b) => a - b);
  return [
    `Replica of ${fmt(s.keys?.median, 0)} keys, filled by state transfer in ${fmt(s.transferMs?.median, 0)} ms (${fmt(s.transferRate?.median)} keys/s); digest tree of 4,096 leaves, fan-out 16.\n`,
    table(
      ['Differing keys', 'check ms', 'min-max', 'messages (requests + replies)', 'hashes, keys and rows carried', 'found and repaired'],
      differences.map((d) => [
        fmt(d, 0),
        fmt(s[`ms@${d}`]?.median, 0),
        range(s[`ms@${d}`], 0),
        fmt(s[`messages@${d}`]?.median, 0),
        fmt(s[`entries@${d}`]?.median, 0),
        fmt(s[`found@${d}`]?.median, 0),
      ]),
    ),
  ].join('\n');
}

/** One line of progress for a finished task. */
export function headline(workload: Workload, result: ChildResult): string {
  if (!result.ok) return `FAILED: ${(result.error ?? '').split('\n')[0]}`;
  const m = result.metrics;
  if (workload === 'raw') return `multi-row ${fmt(m.insertMulti)}/s, 10 conns ${fmt(m.single10)}/s, notify p50 ${fmt(m.notifyP50)} ms`;
  if (workload === 'scheduled') return `${fmt(m.deliveredRate)} delivered/s, late p50 ${fmt(m.lateP50)} p99 ${fmt(m.lateP99)} ms, early ${fmt(m.early, 0)}`;
  if (workload === 'request') return `round trip p50 ${fmt(m.p50)} p99 ${fmt(m.p99)} ms at ${fmt(m.achieved)}/s`;
  if (workload === 'saga') return `${fmt(m.transitionRate)} transitions/s`;
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
