/**
 * The child side of the harness: every system runs in its own process (bench/peers, bench/tidings,
 * bench/baselines), reads its task from argv, and prints one result line on stdout. Logs go to stderr.
 */
import { RESULT_MARK, type ChildResult, type Task, type Workload } from '../protocol.ts';
import { type WorkloadFn, warmedUp } from './measure.ts';
import { HELPER_FLAG, serveHelper } from './helper.ts';
import { endToEnd, latency, PRODUCERS_FLAG, runProducers, type Sides } from './sides.ts';

/**
 * A system's workloads; `sides` also serves its producers' process in the two-process rows (load/sides.ts),
 * `helper` its helper process (load/helper.ts: opens what the helper serves, returns how to close it).
 */
export type SystemImpl = Partial<Record<Workload, WorkloadFn>> & { sides?: Sides; helper?: (task: Task) => Promise<() => Promise<void>> };

function emit(result: ChildResult): void {
  process.stdout.write(`\n${RESULT_MARK}${JSON.stringify(result)}\n`);
}

/**
 * The workloads of a job-queue peer (pg-boss, graphile-worker, BullMQ): its own scheduled, bulk, drain and
 * fan-out runs (bulk, drain and fan-out after a warm-up); end-to-end, standalone and latency from its sides.
 */
export function queuePeer(parts: { sides: Sides; scheduled: WorkloadFn; bulk: WorkloadFn; drain: WorkloadFn; fanout: WorkloadFn }): SystemImpl {
  const { sides } = parts;
  return {
    sides,
    scheduled: parts.scheduled,
    bulk: warmedUp(parts.bulk),
    drain: warmedUp(parts.drain),
    e2e: endToEnd(sides),
    standalone: endToEnd(sides),
    fanout: warmedUp(parts.fanout),
    latency: latency(sides),
  };
}

/** Entry point of a system's child process. */
export function runChild(impl: SystemImpl): void {
  const raw = process.argv[2];
  if (raw === undefined) {
    console.error('usage: node --import tsx bench/<role>/<system>.ts <task json>');
    process.exit(2);
  }
  const task = JSON.parse(raw) as Task;
  if (process.argv[3] === HELPER_FLAG) {
    const helper = impl.helper;
    if (helper === undefined) throw new Error(`${task.system} has no helper process`);
    serveHelper(() => helper(task)).catch((error: unknown) => {
      console.error(error);
      process.exit(1);
    });
    return;
  }
  if (process.argv[3] === PRODUCERS_FLAG) {
    if (impl.sides === undefined) throw new Error(`${task.system} has no producers' side`);
    runProducers(impl.sides, task).catch((error: unknown) => {
      console.error(error);
      process.exit(1);
    });
    return;
  }
  const watchdog = setTimeout(() => {
    emit({ ok: false, error: `${task.label} ${task.workload}: no result after ${task.timeoutMs} ms (hang?)`, metrics: {} });
    process.exit(3);
  }, task.timeoutMs);
  watchdog.unref();
  const fn = impl[task.workload];
  if (fn === undefined) {
    emit({ ok: false, error: `${task.system} does not implement ${task.workload}`, metrics: {} });
    process.exit(2);
  }
  fn(task).then(
    (result) => {
      emit(result);
      // Leftover timers or sockets of a library must not keep the process (or the parent) waiting.
      process.exit(0);
    },
    (error: unknown) => {
      const message = error instanceof Error ? `${error.message}\n${error.stack ?? ''}` : String(error);
      emit({ ok: false, error: message, metrics: {} });
      process.exit(1);
    },
  );
}
