/** Aggregates the runs into medians and ranges, prints the tables, checks the targets, draws the charts. */
import * as vega from 'vega';
import * as vl from 'vega-lite';
import { BROKER_TITLES, BROKERS } from './brokers.ts';
import { WORKLOAD_TITLES, type Row } from './plan.ts';
import type { ChildResult, LatencySeries, SystemName, Workload } from './types.ts';

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
function table(header: string[], rows: string[][], left = 1): string {
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
  ['single10notify', 'single-row INSERT + pg_notify in each, 10 connections', 'rows/s'],
  ['notifyP50', 'NOTIFY -> LISTEN round trip, p50', 'ms'],
  ['notifyP99', 'NOTIFY -> LISTEN round trip, p99', 'ms'],
];

/** The readable report: one table per workload (and per group), then the targets. */
export function renderTables(entries: Entry[]): string {
  const out: string[] = [];
  for (const workload of ['raw', 'bulk', 'drain', 'e2e', 'standalone', 'fanout', 'latency', 'login', 'drift'] as Workload[]) {
    for (const group of groupsOf(entries, workload)) {
      const first = group[0]!;
      const kind = first.row.group;
      const suffix = kind === 'guarantees' ? ' -- guarantees on (workload 6)' : kind === 'rabbitmq' || kind === 'nats' ? BROKER_TITLES[kind] : '';
      const events = first.summary.events?.median;
      const seconds = first.summary.publishSeconds?.median;
      const size =
        events === undefined || workload === 'raw' || first.row.group === 'replica'
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
            rows.push([
              `${e.row.label} @ ${rate}/s`,
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
        const extra = workload === 'drain' ? 'handler rate' : workload === 'bulk' ? '' : 'producer rate';
        const extraKey = workload === 'drain' ? 'handlerRate' : 'producerRate';
        const header = ['System', 'events/s median', 'min-max', 'x Tidings'];
        if (extra !== '') header.push(`${extra} median`);
        const queries = group.some((e) => e.summary.queriesPerEvent !== undefined);
        if (queries) header.push('queries/event');
        // Workloads 3 and 4 publish for a time: each row's own number of events.
        const timed = group.some((e) => e.summary.publishSeconds !== undefined);
        if (timed) header.push('events median');
        out.push(
          table(
            header,
            group.map((e) => {
              const cells = [e.row.label, fmt(e.summary.rate?.median), range(e.summary.rate), ratio(e.summary.rate?.median, reference?.summary.rate?.median)];
              if (extra !== '') cells.push(fmt(e.summary[extraKey]?.median));
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

/** Workload 9 (bench/systems/replica.ts): the two login paths side by side; the drift check per number of differences. */
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

// ---- targets (issue 8) ----------------------------------------------------------------------------

export interface TargetCheck {
  id: string;
  measure: string;
  value: string;
  target: string;
  floor: string;
  verdict: 'target' | 'floor' | 'missed' | 'n/a';
}

function find(entries: Entry[], workload: Workload, label: string): Entry | undefined {
  return entries.find((e) => e.workload === workload && e.row.label === label);
}

export function checkTargets(entries: Entry[], tidings: string, keyed: string): TargetCheck[] {
  const m = (workload: Workload, label: string, metric: string) => find(entries, workload, label)?.summary[metric]?.median;
  const higher = (v: number | undefined, target: number, floor: number): TargetCheck['verdict'] =>
    v === undefined ? 'n/a' : v >= target ? 'target' : v >= floor ? 'floor' : 'missed';
  const lower = (v: number | undefined, target: number, floor: number): TargetCheck['verdict'] =>
    v === undefined ? 'n/a' : v <= target ? 'target' : v <= floor ? 'floor' : 'missed';
  const worst = (...verdicts: TargetCheck['verdict'][]): TargetCheck['verdict'] =>
    verdicts.includes('n/a') ? 'n/a' : verdicts.includes('missed') ? 'missed' : verdicts.includes('floor') ? 'floor' : 'target';
  const raw10 = m('raw', 'PostgreSQL (pg)', 'single10');
  const rawTx10 = m('raw', 'PostgreSQL (pg)', 'tx10');
  const t1 = m('e2e', keyed, 'rate');
  const t2 = m('standalone', tidings, 'rate');
  const t3 = m('drain', keyed, 'rate');
  const p50 = m('latency', tidings, 'p50@1000');
  const p99 = m('latency', tidings, 'p99@1000');
  const producer = m('e2e', 'Tidings, producers only (no consumer; as many events as raw 10-conn commits)', 'producerRate');
  const loss = producer !== undefined && raw10 !== undefined ? 100 * (1 - producer / raw10) : undefined;
  const lossTx = producer !== undefined && rawTx10 !== undefined ? 100 * (1 - producer / rawTx10) : undefined;
  const t6 = m('bulk', tidings, 'rate');
  const cpu = m('latency', tidings, 'cpu@1000');
  const idle = m('latency', tidings, 'idleQueries');
  return [
    {
      id: 'T1',
      measure: 'e2e events/s, 10 producers, 1 event/tx, 1k keys + inbox',
      value: fmt(t1),
      target: '>= 6,000',
      floor: '>= 4,000',
      verdict: higher(t1, 6_000, 4_000),
    },
    {
      id: 'T2',
      measure: 'standalone publish e2e events/s, 10 callers',
      value: fmt(t2),
      target: '>= 20,000',
      floor: '>= 12,000',
      verdict: higher(t2, 20_000, 12_000),
    },
    { id: 'T3', measure: 'drain events/s, 1k keys + inbox', value: fmt(t3), target: '>= 80,000', floor: '>= 50,000', verdict: higher(t3, 80_000, 50_000) },
    {
      id: 'T4',
      measure: 'latency at 1,000/s, p50 / p99 ms',
      value: `${fmt(p50)} / ${fmt(p99)}`,
      target: '<= 1.5 / <= 8',
      floor: '<= 5 / <= 20',
      verdict: worst(lower(p50, 1.5, 5), lower(p99, 8, 20)),
    },
    {
      id: 'T5',
      measure: 'producers-only commit rate (10, 1 event/tx) lost vs raw 10-connection INSERT (same run)',
      value: loss === undefined ? '-' : `${fmt(loss, 0)} % (${fmt(producer)} vs ${fmt(raw10)}/s)`,
      target: '<= 10 %',
      floor: '<= 25 %',
      verdict: lower(loss, 10, 25),
    },
    {
      id: 'T5b',
      measure: 'the same vs raw BEGIN; INSERT; COMMIT from 10 connections (3 round trips; Tidings sends 1)',
      value: lossTx === undefined ? '-' : `${fmt(lossTx, 0)} % (${fmt(producer)} vs ${fmt(rawTx10)}/s)`,
      target: '<= 10 %',
      floor: '<= 25 %',
      verdict: lower(lossTx, 10, 25),
    },
    { id: 'T6', measure: 'bulk publish events/s', value: fmt(t6), target: '>= 120,000', floor: '>= 80,000', verdict: higher(t6, 120_000, 80_000) },
    {
      id: 'T7',
      measure: 'CPU % of all cores (Node + PostgreSQL) at 1,000/s',
      value: fmt(cpu, 0),
      target: '<= 35',
      floor: '<= 60',
      verdict: lower(cpu, 35, 60),
    },
    { id: 'T8', measure: 'idle queries/s, one consumer (4 partitions)', value: fmt(idle), target: '<= 1', floor: '<= 10', verdict: lower(idle, 1, 10) },
    // T9: Tidings on a broker (no outbox) as a share of a plain client's throughput on the same broker.
    ...BROKERS.map((b): TargetCheck => {
      const share = (workload: Workload) => {
        const mine = m(workload, b.tidings, 'rate');
        const theirs = m(workload, b.plain, 'rate');
        return mine === undefined || theirs === undefined || theirs === 0 ? undefined : (100 * mine) / theirs;
      };
      const drain = share('drain');
      const e2e = share('e2e');
      return {
        id: `T9 ${b.name}`,
        measure: `Tidings on ${b.name} / plain ${b.client}, events/s: drain, e2e`,
        value: `${fmt(drain, 0)} %, ${fmt(e2e, 0)} %`,
        target: '>= 50 %',
        floor: '>= 25 %',
        verdict: worst(higher(drain, 50, 25), higher(e2e, 50, 25)),
      };
    }),
  ];
}

export function renderTargets(checks: TargetCheck[]): string {
  return table(
    ['#', 'Measure (Tidings, this run)', 'value', 'target', 'floor', 'verdict'],
    checks.map((c) => [c.id, c.measure, c.value, c.target, c.floor, c.verdict]),
    6,
  );
}

// ---- charts ---------------------------------------------------------------------------------------

/** Vega-Lite's notices about the faceted charts' independent scales are expected: keep them quiet. */
const quiet = {
  level(): number {
    return 0;
  },
  error(...args: unknown[]) {
    console.error('[vega-lite]', ...args);
    return this;
  },
  warn() {
    return this;
  },
  info() {
    return this;
  },
  debug() {
    return this;
  },
} as NonNullable<Parameters<typeof vl.compile>[1]>['logger'];

async function toSvg(spec: vl.TopLevelSpec): Promise<string> {
  const compiled = vl.compile(spec, { logger: quiet }).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}

/** The workloads of the throughput chart, by name (their numbers belong to issue 8's tables, not to a reader). */
const CHARTED: readonly Workload[] = ['bulk', 'drain', 'e2e', 'standalone', 'fanout'];

/** A workload's title without its number: "Drain a stored backlog (until acknowledged)". */
function workloadName(workload: Workload, group: Row['group']): string {
  const title = WORKLOAD_TITLES[workload].replace(/^\d+[a-z]?\. /, '');
  return `${title}${group === 'guarantees' ? ', guarantees on' : group === 'rabbitmq' ? ', on RabbitMQ' : group === 'nats' ? ', on NATS JetStream' : ''}`;
}

/**
 * One colour per system, the same in every chart and every run: Tidings on any backbone, each peer, each
 * broker's plain client, the raw floor (Tableau 10, readable by most colour-blind readers).
 */
const SYSTEM_COLOURS = {
  Tidings: '#4c78a8',
  'pg-boss': '#f58518',
  'graphile-worker': '#54a24b',
  BullMQ: '#e45756',
  'PostgreSQL (raw)': '#79706e',
  amqplib: '#b279a2',
  'nats.js': '#72b7b2',
} as const;

const FAMILY: Record<SystemName, keyof typeof SYSTEM_COLOURS> = {
  tidings: 'Tidings',
  replica: 'Tidings',
  rabbitmq: 'Tidings',
  nats: 'Tidings',
  pgboss: 'pg-boss',
  graphile: 'graphile-worker',
  bullmq: 'BullMQ',
  raw: 'PostgreSQL (raw)',
  amqp: 'amqplib',
  natsjs: 'nats.js',
};

/** Dashes for a system's second, third... row (Tidings with the guarantees on beside plain Tidings). */
const DASHES = [
  [1, 0],
  [6, 3],
  [2, 2],
  [8, 2, 2, 2],
  [12, 4],
  [4, 4, 1, 4],
];

/**
 * The colour and dash encodings of `rows` (the latency chart's lines), as one legend beside the plots
 * listing every row by its full label: each takes its system's colour; rows of one system differ by dashes.
 */
export function systemEncodings(rows: readonly Pick<Row, 'system' | 'label'>[]): { color: Record<string, unknown>; strokeDash: Record<string, unknown> } {
  const labels = [...new Set(rows.map((row) => row.label))];
  const systemOf = new Map(rows.map((row) => [row.label, row.system]));
  const seen = new Map<string, number>();
  const dashes = labels.map((label) => {
    const family = FAMILY[systemOf.get(label)!];
    const index = seen.get(family) ?? 0;
    seen.set(family, index + 1);
    return DASHES[index % DASHES.length]!;
  });
  const legend = { orient: 'right', title: null, labelLimit: 1_000, symbolType: 'stroke', symbolSize: 400, symbolStrokeWidth: 2 };
  return {
    color: { field: 'label', type: 'nominal', scale: { domain: labels, range: labels.map((label) => SYSTEM_COLOURS[FAMILY[systemOf.get(label)!]]) }, legend },
    strokeDash: { field: 'label', type: 'nominal', scale: { domain: labels, range: dashes }, legend },
  };
}

export async function throughputChart(entries: Entry[], subtitle: string): Promise<string> {
  const charted = entries.filter((e) => CHARTED.includes(e.workload) && e.summary.rate !== undefined);
  const values = charted.map((e) => ({
    workload: workloadName(e.workload, e.row.group),
    label: e.row.label,
    system: FAMILY[e.row.system],
    median: Math.round(e.summary.rate!.median),
    min: Math.round(e.summary.rate!.min),
    max: Math.round(e.summary.rate!.max),
  }));
  // The bars are labelled on their axis: the legend names the systems, one colour each.
  const systems = (Object.keys(SYSTEM_COLOURS) as (keyof typeof SYSTEM_COLOURS)[]).filter((system) => values.some((value) => value.system === system));
  const color = {
    field: 'system',
    type: 'nominal',
    scale: { domain: systems, range: systems.map((system) => SYSTEM_COLOURS[system]) },
    legend: { orient: 'right', title: 'system', labelLimit: 1_000 },
  } as const;
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title: { text: 'Throughput, events/s (median of rounds, bars: min-max)', subtitle },
    data: { values },
    facet: {
      row: {
        field: 'workload',
        type: 'nominal',
        title: null,
        sort: null,
        header: { labelAngle: 0, labelOrient: 'top', labelAnchor: 'start', labelFontWeight: 'bold', labelFontSize: 12, labelLimit: 1_000 },
      },
    },
    spec: {
      width: 460,
      height: { step: 16 },
      layer: [
        {
          mark: { type: 'bar' },
          encoding: {
            y: { field: 'label', type: 'nominal', title: null, sort: null, axis: { labelLimit: 1_000 } },
            x: { field: 'median', type: 'quantitative', title: 'events/s' },
            color,
          },
        },
        {
          mark: { type: 'rule' },
          encoding: {
            y: { field: 'label', type: 'nominal', sort: null },
            x: { field: 'min', type: 'quantitative' },
            x2: { field: 'max' },
          },
        },
        {
          mark: { type: 'text', align: 'left', dx: 4, fontSize: 9 },
          encoding: {
            y: { field: 'label', type: 'nominal', sort: null },
            x: { field: 'max', type: 'quantitative' },
            text: { field: 'median', type: 'quantitative', format: ',' },
          },
        },
      ],
    },
    resolve: { scale: { x: 'independent', y: 'independent' } },
  };
  return toSvg(spec);
}

export async function latencyChart(entries: Entry[], subtitle: string): Promise<string> {
  const latency = entries.filter((e) => e.workload === 'latency');
  const values = latency.flatMap((e) =>
    (e.series ?? []).flatMap((s) =>
      s.quantiles.map(([p, ms]) => ({ label: e.row.label, rate: `${s.rate} events/s`, rateValue: s.rate, percentile: p, ms: Math.max(ms, 0.01) })),
    ),
  );
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title: { text: 'Latency, publish call -> handler start (median run)', subtitle },
    data: { values },
    facet: { column: { field: 'rate', type: 'nominal', title: null, sort: { field: 'rateValue', op: 'min' } } },
    spec: {
      width: 360,
      height: 260,
      mark: { type: 'line', point: { size: 12 } },
      encoding: {
        x: { field: 'percentile', type: 'ordinal', title: 'percentile', sort: null },
        y: { field: 'ms', type: 'quantitative', scale: { type: 'log' }, title: 'ms (log)' },
        ...systemEncodings(latency.map((e) => e.row)),
      },
    },
  };
  return toSvg(spec);
}
