/** The report's charts (vega-lite, rendered to SVG): throughput bars and latency distributions. */
import * as vega from 'vega';
import * as vl from 'vega-lite';
import type { SystemName, Workload } from '../protocol.ts';
import { brokerOf } from './brokers.ts';
import { WORKLOAD_TITLES } from './plan.ts';
import type { Entry } from './report.ts';
import type { Row } from './rows.ts';

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
  const broker = brokerOf(group);
  const where = broker === undefined ? '' : `, on ${broker.name === 'NATS' ? 'NATS JetStream' : broker.name}${broker.steadyGroup === group ? ', steady' : ''}`;
  return `${title}${group === 'guarantees' ? ', guarantees on' : where}`;
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
  'HTTP (loopback)': '#eeca3b',
  'NATS core': '#9d755d',
} as const;

const FAMILY: Record<SystemName, keyof typeof SYSTEM_COLOURS> = {
  tidings: 'Tidings',
  replica: 'Tidings',
  rabbitmq: 'Tidings',
  nats: 'Tidings',
  tenancy: 'Tidings',
  pgboss: 'pg-boss',
  graphile: 'graphile-worker',
  bullmq: 'BullMQ',
  raw: 'PostgreSQL (raw)',
  amqp: 'amqplib',
  natsjs: 'nats.js',
  http: 'HTTP (loopback)',
  natscore: 'NATS core',
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
