/**
 * The benchmark's charts (bench/lib/report.ts): one colour per system in every chart, full labels,
 * workloads by name, a legend beside the plots.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { latencyChart, systemEncodings, throughputChart } from '../bench/harness/charts.ts';
import type { Entry } from '../bench/harness/report.ts';
import type { Row } from '../bench/harness/rows.ts';

const plain = { keys: 0, effects: false, inbox: true };
const row = (system: Row['system'], label: string, group: Row['group'] = 'base'): Row => ({ system, label, variant: plain, group });
const rate = (median: number) => ({ rate: { median, min: median * 0.9, max: median * 1.1, n: 3 } });
const long = 'Tidings, producers only (no consumer; as many events as raw 10-conn commits)';

const entries: Entry[] = [
  { workload: 'drain', row: row('tidings', 'Tidings'), runs: [], summary: rate(66_000) },
  { workload: 'drain', row: row('pgboss', 'pg-boss'), runs: [], summary: rate(4_000) },
  { workload: 'e2e', row: row('tidings', long, 'guarantees'), runs: [], summary: rate(14_000) },
  { workload: 'e2e', row: row('bullmq', 'BullMQ'), runs: [], summary: rate(20_000) },
  {
    workload: 'latency',
    row: row('tidings', 'Tidings'),
    runs: [],
    summary: {},
    series: [
      {
        rate: 500,
        quantiles: [
          [50, 0.9],
          [99, 4],
        ],
      },
    ],
  } as Entry,
  {
    workload: 'latency',
    row: row('tidings', 'Tidings, 1k keys, inbox, no-op', 'guarantees'),
    runs: [],
    summary: {},
    series: [
      {
        rate: 500,
        quantiles: [
          [50, 1],
          [99, 5],
        ],
      },
    ],
  } as Entry,
  {
    workload: 'latency',
    row: row('pgboss', 'pg-boss'),
    runs: [],
    summary: {},
    series: [
      {
        rate: 500,
        quantiles: [
          [50, 250],
          [99, 500],
        ],
      },
    ],
  } as Entry,
];

test('each system keeps its colour in every chart; rows of one system differ by their dashes', () => {
  const a = systemEncodings([row('tidings', 'Tidings'), row('pgboss', 'pg-boss'), row('tidings', 'Tidings, guarantees on')]);
  const b = systemEncodings([row('pgboss', 'pg-boss'), row('rabbitmq', 'Tidings on RabbitMQ')]);
  const colours = (encoding: ReturnType<typeof systemEncodings>) => {
    const scale = encoding.color.scale as { domain: string[]; range: string[] };
    return Object.fromEntries(scale.domain.map((label, index) => [label, scale.range[index]]));
  };
  assert.equal(colours(a)['pg-boss'], colours(b)['pg-boss']);
  assert.equal(colours(a).Tidings, colours(b)['Tidings on RabbitMQ'], 'Tidings on any backbone is one system');
  assert.notEqual(colours(a).Tidings, colours(a)['pg-boss']);
  const dashes = (a.strokeDash.scale as { range: number[][] }).range;
  assert.notDeepEqual(dashes[0], dashes[2], 'two Tidings rows are told apart');
});

test('the charts name workloads, keep full labels and put a legend beside the plots', async () => {
  const throughput = await throughputChart(entries, 'a test run');
  assert.match(throughput, />Drain a stored backlog \(until acknowledged\)</);
  assert.match(throughput, />End to end, 10 producers, one event per transaction, guarantees on</);
  assert.doesNotMatch(throughput, />\d\. /, 'no workload numbers');
  assert.ok(throughput.includes(`>${long}<`), 'the longest label whole');
  assert.match(throughput, />system</, 'a legend of systems');
  const latency = await latencyChart(entries, 'a test run');
  assert.match(latency, />Tidings, 1k keys, inbox, no-op</);
});
