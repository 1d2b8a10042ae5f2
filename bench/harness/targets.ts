/** The goals of issue 24 (and issue 8's T5, issue 21's scheduled latency), checked against a run's medians (reported, never asserted). */
import type { Workload } from '../protocol.ts';
import { BROKERS, coldLabel, steadyLabel } from './brokers.ts';
import { LABELS, ROW, withRls } from './plan.ts';
import { type Entry, fmt, table } from './report.ts';

export interface TargetCheck {
  id: string;
  measure: string;
  value: string;
  goal: string;
  verdict: 'met' | 'missed' | 'n/a';
}

function find(entries: Entry[], workload: Workload, label: string): Entry | undefined {
  return entries.find((e) => e.workload === workload && e.row.label === label);
}

/** The goals of issue 24, each a ratio of two figures of the same run (this machine's speed varies 3x by day). */
export function checkTargets(entries: Entry[]): TargetCheck[] {
  const m = (workload: Workload, label: string, metric: string) => find(entries, workload, label)?.summary[metric]?.median;
  const share = (a: number | undefined, b: number | undefined) => (a === undefined || b === undefined || b === 0 ? undefined : a / b);
  const pct = (v: number | undefined) => (v === undefined ? '-' : `${fmt(100 * v, 0)} %`);
  const times = (v: number | undefined) => (v === undefined ? '-' : `${fmt(v, 2)}x`);
  const higher = (v: number | undefined, goal: number): TargetCheck['verdict'] => (v === undefined ? 'n/a' : v >= goal ? 'met' : 'missed');
  const lower = (v: number | undefined, goal: number): TargetCheck['verdict'] => (v === undefined ? 'n/a' : v <= goal ? 'met' : 'missed');
  const both = (a: TargetCheck['verdict'], b: TargetCheck['verdict']): TargetCheck['verdict'] =>
    a === 'n/a' || b === 'n/a' ? 'n/a' : a === 'met' && b === 'met' ? 'met' : 'missed';
  const raw = (metric: string) => m('raw', ROW.raw, metric);
  const bull = `${LABELS.bullmq} (2 processes)`;
  const tid = `${LABELS.tidings} (2 processes)`;

  const e2eBusiness = share(m('e2e', ROW.keyedBusiness2, 'rate'), raw('business10'));
  const standalone = share(m('standalone', tid, 'rate'), m('standalone', bull, 'rate'));
  const drain = share(m('drain', ROW.drainSteadyKeyed, 'rate'), raw('insertJson'));
  const bulk = share(m('bulk', `${LABELS.tidings}, steady`, 'rate'), raw('copy'));
  const p50 = share(m('latency', tid, 'p50@1000'), m('latency', bull, 'p50@1000'));
  const p99 = share(m('latency', tid, 'p99@1000'), m('latency', bull, 'p99@1000'));
  const cpuT = m('latency', tid, 'cpu@1000');
  const cpuB = m('latency', bull, 'cpu@1000');
  const fan = share(m('e2e', 'Tidings, 16 subscriptions', 'rate'), m('e2e', 'Tidings, 1 subscription', 'rate'));
  const backlogs = entries.filter((e) => e.workload === 'backlog' && e.summary.firstMessageMs !== undefined);
  const largest = backlogs.sort((x, y) => (y.summary.events?.median ?? 0) - (x.summary.events?.median ?? 0))[0];
  const first = largest?.summary.firstMessageMs?.median;
  const producersEmpty = share(m('e2e', ROW.producersEmpty, 'producerRate'), raw('single10'));
  const producersBusiness = share(m('e2e', ROW.producersBusiness, 'producerRate'), raw('business10'));
  // Issue 22: telemetry's cost, each workload's rows against its telemetry-off row.
  const traced = (workload: Workload, suffix: string) => {
    const off = m(workload, `${ROW.telemetryOff}${suffix}`, 'rate');
    return { noop: share(m(workload, `${ROW.telemetryNoop}${suffix}`, 'rate'), off), sdk: share(m(workload, `${ROW.telemetrySdk}${suffix}`, 'rate'), off) };
  };
  const tracedE2e = traced('e2e', ' (1 process)');
  const tracedDrain = traced('drain', ', steady');
  const rls = (workload: Workload, label: string) => share(m(workload, withRls(label), 'rate'), m(workload, label, 'rate'));
  const [rlsDrain, rlsE2e, rlsE2eTx] = [rls('drain', ROW.tenantsDrain), rls('e2e', ROW.tenantsE2e), rls('e2e', ROW.tenantsE2eTx)];
  const quietAgainstAlone = (metric: string) => {
    const alone = m('fairness', ROW.quietAlone, metric);
    return {
      fair: share(m('fairness', ROW.quietNoisyFair, metric), alone),
      off: share(m('fairness', ROW.quietNoisy, metric), alone),
      isolated: share(m('fairness', ROW.quietNoisyIsolated, metric), alone),
    };
  };
  const quiet = quietAgainstAlone('quietP99');
  const quietDelivery = quietAgainstAlone('quietDeliveryP99');
  const quietSteady = quietAgainstAlone('quietSteadyDeliveryP99');
  const scheduledP99 = m('scheduled', `${LABELS.tidings}, 1,000 due/s`, 'lateP99');
  return [
    {
      id: 'G1',
      measure: 'e2e, business row + event per tx, 2 processes, 1k keys + inbox / raw (the same tx without the event)',
      value: pct(e2eBusiness),
      goal: '>= 75 %',
      verdict: higher(e2eBusiness, 0.75),
    },
    {
      id: 'G2',
      measure: 'standalone publish e2e, 10 callers, 2 processes / BullMQ (durable against not durable)',
      value: times(standalone),
      goal: '>= 1.0x',
      verdict: higher(standalone, 1),
    },
    { id: 'G3', measure: 'drain, 1k keys + inbox, steady / raw JSON-array INSERT', value: pct(drain), goal: '>= 80 %', verdict: higher(drain, 0.8) },
    { id: 'G4', measure: 'bulk publishMany, steady / raw COPY', value: pct(bulk), goal: '>= 85 %', verdict: higher(bulk, 0.85) },
    {
      id: 'G5',
      measure: "latency at 1,000/s, 2 processes, p50 / p99, as a multiple of BullMQ's",
      value: `${times(p50)} / ${times(p99)}`,
      goal: '<= 1.0x',
      verdict: both(lower(p50, 1), lower(p99, 1)),
    },
    {
      id: 'G6',
      measure: "CPU (Node + server) at 1,000/s, 2 processes, % of all cores, beside BullMQ's",
      value: `${fmt(cpuT, 0)} % (BullMQ ${fmt(cpuB, 0)} %)`,
      goal: "<= BullMQ's",
      verdict: cpuT === undefined || cpuB === undefined ? 'n/a' : lower(cpuT, cpuB),
    },
    { id: 'G7', measure: 'fan-out: e2e events/s with 16 subscriptions / with 1', value: pct(fan), goal: '>= 70 %', verdict: higher(fan, 0.7) },
    {
      id: 'G8',
      measure: `time to first message, backlog ${fmt(largest?.summary.events?.median, 0)}, a fresh subscription from the beginning`,
      value: first === undefined ? '-' : `${fmt(first)} ms`,
      goal: '<= 50 ms at 1,000,000',
      verdict: lower(first, 50),
    },
    ...BROKERS.map((b): TargetCheck => {
      const of = (workload: Workload, label: (l: string) => string) => share(m(workload, label(b.tidings), 'rate'), m(workload, label(b.plain), 'rate'));
      const d = of('drain', steadyLabel);
      const cold = of('drain', coldLabel);
      const e = of('e2e', (l) => l);
      return {
        id: `G9 ${b.name}`,
        measure: `Tidings on ${b.name} / plain ${b.client}, events/s: drain steady, e2e (drain cold start, not judged)`,
        value: `${pct(d)}, ${pct(e)} (${pct(cold)})`,
        goal: '>= 90 % each',
        verdict: both(higher(d, 0.9), higher(e, 0.9)),
      };
    }),
    {
      id: 'R1',
      measure: 'row-level security: events/s with RLS / without (20 tenants): drain steady; e2e no-op; e2e insert via ctx.tx (issue 23)',
      value: `${pct(rlsDrain)}; ${pct(rlsE2e)}; ${pct(rlsE2eTx)}`,
      goal: '>= 90 % each',
      verdict: both(both(higher(rlsDrain, 0.9), higher(rlsE2e, 0.9)), higher(rlsE2eTx, 0.9)),
    },
    {
      id: 'F1',
      measure:
        "quiet tenants' p99 beside a noisy tenant's backlog and 5,000/s / alone: delivery (publish call's return -> handler), fairness on (off) [noisy tenant on a subscription of its own: the load alone]; the same after the first second; publish call -> handler (issue 23)",
      value: `${times(quietDelivery.fair)} (${times(quietDelivery.off)}) [${times(quietDelivery.isolated)}]; ${times(quietSteady.fair)} (${times(quietSteady.off)}) [${times(quietSteady.isolated)}]; ${times(quiet.fair)} (${times(quiet.off)}) [${times(quiet.isolated)}]`,
      goal: '<= 2.0x (delivery)',
      verdict: lower(quietDelivery.fair, 2),
    },
    {
      id: 'T5',
      measure: 'producers only (10, 1 event/tx) / raw 10-connection commits: empty tx vs autocommit INSERT; business row vs the same tx without the event',
      value: `${pct(producersEmpty)}; ${pct(producersBusiness)}`,
      goal: '>= 90 % (issue 8)',
      verdict: both(higher(producersEmpty, 0.9), higher(producersBusiness, 0.9)),
    },
    {
      id: 'O1',
      measure: 'telemetry, no-op tracer and meter (API, no SDK) / telemetry off, events/s: e2e (1 process), drain (steady)',
      value: `${pct(tracedE2e.noop)}, ${pct(tracedDrain.noop)}`,
      goal: '>= 95 % each (issue 22)',
      verdict: both(higher(tracedE2e.noop, 0.95), higher(tracedDrain.noop, 0.95)),
    },
    {
      id: 'O2',
      measure: 'telemetry, OTel SDK sampling every span / telemetry off, events/s: e2e (1 process), drain (steady)',
      value: `${pct(tracedE2e.sdk)}, ${pct(tracedDrain.sdk)}`,
      goal: 'reported (issue 22)',
      verdict: 'n/a',
    },
    {
      id: 'S1',
      measure: 'scheduled delivery on PostgreSQL, 1,000 due/s: lateness (due time -> handler start) p99',
      value: scheduledP99 === undefined ? '-' : `${fmt(scheduledP99)} ms`,
      goal: '< 100 ms (issue 21)',
      verdict: scheduledP99 === undefined ? 'n/a' : scheduledP99 < 100 ? 'met' : 'missed',
    },
  ];
}

export function renderTargets(checks: TargetCheck[]): string {
  return table(
    ['#', 'Measure (Tidings, this run)', 'value', 'goal', 'verdict'],
    checks.map((c) => [c.id, c.measure, c.value, c.goal, c.verdict]),
    5,
  );
}
