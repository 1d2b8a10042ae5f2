/**
 * Request/reply (issue 21): an open-loop requester at the task's rate for `latencySeconds`, each call timed
 * from just before it to its answer; the replier runs in a helper process. CPU counts both processes and the
 * servers.
 */
import type { ChildResult, Task } from '../protocol.ts';
import { CpuMeter } from './cpu.ts';
import { openLoop } from './latency.ts';
import { now, percentile } from './measure.ts';

export async function roundTrips(task: Task, servers: readonly string[], helperPid: number, call: (seq: number) => Promise<unknown>): Promise<ChildResult> {
  const doneAt = new Map<number, number>();
  const timed = async (seq: number) => {
    await call(seq);
    doneAt.set(seq, now());
  };
  await openLoop(200, 0.5, 0, timed); // connections and JIT ready: not measured
  const rate = task.rates[0]!;
  const meter = new CpuMeter(servers, task.database, [helperPid]);
  meter.start();
  const phase = await openLoop(rate, task.latencySeconds, 1_000_000, timed);
  const cpu = meter.stop();
  const sorted = phase.sentAt
    .map(([seq, t0]) => (doneAt.has(seq) ? doneAt.get(seq)! - t0 : undefined))
    .filter((v): v is number => v !== undefined)
    .sort((a, b) => a - b);
  return {
    ok: true,
    metrics: {
      p50: percentile(sorted, 50),
      p99: percentile(sorted, 99),
      p999: percentile(sorted, 99.9),
      achieved: phase.achievedRate,
      errors: phase.errors,
      cpu: cpu.nodeAndServer,
      cpuMachine: cpu.machine,
    },
  };
}
