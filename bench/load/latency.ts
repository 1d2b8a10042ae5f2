/** The latency workload: an open-loop producer at fixed rates, publish call -> handler start, with the CPU it cost. */
import type { ChildResult, Task } from '../protocol.ts';
import { CpuMeter } from './cpu.ts';
import { CHART_PERCENTILES, Counter, now, percentile, sleep } from './measure.ts';

/**
 * Open-loop producer at `rate` events/s for `seconds`: each event is published when its time comes,
 * whether or not earlier ones have finished. Latency is from just before the publish call to the
 * handler's start (`started` is called by the handler with the event's seq).
 */
export class LatencyRun {
  readonly sentAt = new Map<number, number>();
  readonly latencies: number[] = [];
  errors = 0;
  #handled = new Counter();

  started(seq: number): void {
    const t0 = this.sentAt.get(seq);
    if (t0 === undefined) return;
    this.sentAt.delete(seq);
    this.latencies.push(now() - t0);
    this.#handled.add();
  }

  async run(rate: number, seconds: number, firstSeq: number, publish: (seq: number) => Promise<unknown>): Promise<{ sent: number; achievedRate: number }> {
    const total = Math.round(rate * seconds);
    const begin = now();
    let sent = 0;
    const inFlight = new Set<Promise<unknown>>();
    while (sent < total) {
      const due = Math.min(total, Math.floor(((now() - begin) / 1000) * rate) + 1);
      while (sent < due) {
        const seq = firstSeq + sent++;
        this.sentAt.set(seq, now());
        const p = publish(seq).catch(() => {
          this.errors++;
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
    return { sent, achievedRate: sent / elapsed };
  }

  async settle(expected: number, timeoutMs: number): Promise<void> {
    await this.#handled.until(expected, timeoutMs, 'latency events handled');
  }
}

/** Runs the latency phases (one per rate) and returns their figures; `meter` names the server processes. */
export async function latencyPhases(
  task: Task,
  servers: readonly string[],
  publish: (seq: number) => Promise<unknown>,
  setHandlerProbe: (probe: (seq: number) => void) => void,
): Promise<Pick<ChildResult, 'metrics' | 'series'>> {
  const metrics: Record<string, number> = {};
  const series: NonNullable<ChildResult['series']> = [];
  let seq = 1_000_000;
  // A short warm-up so that connections and JIT are ready: not measured.
  {
    const warm = new LatencyRun();
    setHandlerProbe((s) => warm.started(s));
    const { sent } = await warm.run(200, 0.5, seq, publish);
    seq += sent;
    await warm.settle(sent, 20_000);
  }
  for (const rate of task.rates) {
    const probe = new LatencyRun();
    setHandlerProbe((s) => probe.started(s));
    const meter = new CpuMeter(servers, task.database);
    meter.start();
    const { sent, achievedRate } = await probe.run(rate, task.latencySeconds, seq, publish);
    const cpu = meter.stop();
    seq += sent;
    await probe.settle(sent - probe.errors, 30_000);
    const sorted = [...probe.latencies].sort((a, b) => a - b);
    metrics[`p50@${rate}`] = percentile(sorted, 50);
    metrics[`p99@${rate}`] = percentile(sorted, 99);
    metrics[`p999@${rate}`] = percentile(sorted, 99.9);
    metrics[`max@${rate}`] = sorted[sorted.length - 1] ?? Number.NaN;
    metrics[`achieved@${rate}`] = achievedRate;
    metrics[`cpu@${rate}`] = cpu.nodeAndServer;
    metrics[`cpuNode@${rate}`] = cpu.node;
    metrics[`cpuServer@${rate}`] = cpu.server;
    metrics[`cpuMachine@${rate}`] = cpu.machine;
    metrics[`errors@${rate}`] = probe.errors;
    series.push({ rate, quantiles: CHART_PERCENTILES.map((p) => [p, percentile(sorted, p)] as [number, number]) });
  }
  return { metrics, series };
}
