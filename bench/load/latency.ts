/**
 * The latency workload: an open-loop producer at fixed rates, publish call -> handler start, with the CPU it
 * cost. The producer may run in this process or in another (a two-process row): times are taken on the
 * machine's monotonic clock (`now()`), which every process shares.
 */
import type { ChildResult, Task } from '../protocol.ts';
import { CpuMeter } from './cpu.ts';
import { CHART_PERCENTILES, Counter, now, percentile, sleep } from './measure.ts';

/** What an open-loop phase sent: when each event's publish call began, and how fast calls could be made. */
export interface Sent {
  sent: number;
  achievedRate: number;
  errors: number;
  /** [seq, publish call began (ms, monotonic)] */
  sentAt: Array<[number, number]>;
}

/**
 * Open-loop producer at `rate` events/s for `seconds`: each event is published when its time comes, whether
 * or not earlier ones have finished; sequence numbers from `firstSeq`.
 */
export async function openLoop(rate: number, seconds: number, firstSeq: number, publish: (seq: number) => Promise<unknown>): Promise<Sent> {
  const total = Math.round(rate * seconds);
  const sentAt: Array<[number, number]> = [];
  const begin = now();
  let sent = 0;
  let errors = 0;
  const inFlight = new Set<Promise<unknown>>();
  while (sent < total) {
    const due = Math.min(total, Math.floor(((now() - begin) / 1000) * rate) + 1);
    while (sent < due) {
      const seq = firstSeq + sent++;
      sentAt.push([seq, now()]);
      const p = publish(seq).catch(() => {
        errors++;
      });
      inFlight.add(p);
      void p.finally(() => inFlight.delete(p));
    }
    const nextAt = begin + (sent * 1000) / rate;
    const wait = nextAt - now();
    await sleep(wait > 1 ? Math.floor(wait) : 0);
  }
  const elapsed = (now() - begin) / 1000;
  await Promise.all(inFlight);
  return { sent, achievedRate: sent / elapsed, errors, sentAt };
}

/** Handler starts, by seq: the consumer's side of the measure. */
export class Starts {
  readonly at = new Map<number, number>();
  readonly #count = new Counter();
  started(seq: number): void {
    if (this.at.has(seq)) return;
    this.at.set(seq, now());
    this.#count.add();
  }
  until(n: number, timeoutMs: number): Promise<void> {
    return this.#count.until(n, timeoutMs, 'latency events handled');
  }
}

/**
 * A system that cannot sustain the offered rate builds a queue: its latency then measures the queue's
 * growth, not a message's way through. Flagged when the calls could not be made at 95 % of the rate, or
 * when the last fifth of the events waited more than twice as long as the first fifth (and 50 ms more).
 */
export function sustained(sent: Sent, latencyOf: (seq: number) => number | undefined, rate: number): boolean {
  if (sent.achievedRate < 0.95 * rate) return false;
  const fifth = Math.max(1, Math.floor(sent.sentAt.length / 5));
  const p50 = (slice: Array<[number, number]>) =>
    percentile(
      slice
        .map(([seq]) => latencyOf(seq))
        .filter((v): v is number => v !== undefined)
        .sort((a, b) => a - b),
      50,
    );
  const first = p50(sent.sentAt.slice(0, fifth));
  const last = p50(sent.sentAt.slice(-fifth));
  return !(last > 2 * first + 50);
}

/** Where the latency phases' events come from: a function in this process, or the producers' process. */
export interface LatencyProducer {
  phase(rate: number, seconds: number, firstSeq: number): Promise<Sent>;
  /** Processes besides this one whose CPU counts (the producers'). */
  pids: readonly number[];
}

export function localProducer(publish: (seq: number) => Promise<unknown>): LatencyProducer {
  return { phase: (rate, seconds, firstSeq) => openLoop(rate, seconds, firstSeq, publish), pids: [] };
}

/**
 * Runs the latency phases (one per rate) and returns their figures; `servers` names the server processes.
 * `setHandlerProbe` receives the function the handler calls with the event's seq as it starts.
 */
export async function latencyPhases(
  task: Task,
  servers: readonly string[],
  producer: LatencyProducer | ((seq: number) => Promise<unknown>),
  setHandlerProbe: (probe: (seq: number) => void) => void,
): Promise<Pick<ChildResult, 'metrics' | 'series'>> {
  const source = typeof producer === 'function' ? localProducer(producer) : producer;
  const metrics: Record<string, number> = {};
  const series: NonNullable<ChildResult['series']> = [];
  let seq = 1_000_000;
  // A short warm-up so that connections and JIT are ready: not measured.
  {
    const starts = new Starts();
    setHandlerProbe((s) => starts.started(s));
    const warm = await source.phase(200, 0.5, seq);
    seq += warm.sent;
    await starts.until(warm.sent - warm.errors, 20_000);
  }
  for (const rate of task.rates) {
    const starts = new Starts();
    setHandlerProbe((s) => starts.started(s));
    const meter = new CpuMeter(servers, task.database, source.pids);
    meter.start();
    const phase = await source.phase(rate, task.latencySeconds, seq);
    const cpu = meter.stop();
    seq += phase.sent;
    await starts.until(phase.sent - phase.errors, 30_000);
    const sentAt = new Map(phase.sentAt);
    const latencyOf = (s: number) => {
      const t1 = starts.at.get(s);
      const t0 = sentAt.get(s);
      return t1 === undefined || t0 === undefined ? undefined : t1 - t0;
    };
    const sorted = phase.sentAt
      .map(([s]) => latencyOf(s))
      .filter((v): v is number => v !== undefined)
      .sort((a, b) => a - b);
    metrics[`p50@${rate}`] = percentile(sorted, 50);
    metrics[`p99@${rate}`] = percentile(sorted, 99);
    metrics[`p999@${rate}`] = percentile(sorted, 99.9);
    metrics[`max@${rate}`] = sorted[sorted.length - 1] ?? Number.NaN;
    metrics[`achieved@${rate}`] = phase.achievedRate;
    metrics[`sustained@${rate}`] = sustained(phase, latencyOf, rate) ? 1 : 0;
    metrics[`cpu@${rate}`] = cpu.nodeAndServer;
    metrics[`cpuNode@${rate}`] = cpu.node;
    metrics[`cpuServer@${rate}`] = cpu.server;
    metrics[`cpuMachine@${rate}`] = cpu.machine;
    metrics[`errors@${rate}`] = phase.errors;
    series.push({ rate, quantiles: CHART_PERCENTILES.map((p) => [p, percentile(sorted, p)] as [number, number]) });
  }
  return { metrics, series };
}
