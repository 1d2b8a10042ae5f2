/** The targets of issues 8 and 24, checked against a run's medians (reported, never asserted). */
import type { Workload } from '../protocol.ts';
import { BROKERS } from './brokers.ts';
import { type Entry, fmt, table } from './report.ts';

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
