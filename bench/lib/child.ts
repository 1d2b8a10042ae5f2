/**
 * The child side of the harness: every system runs in its own process (bench/systems/<x>.ts), reads its
 * task from argv, and prints one result line on stdout. Logs go to stderr.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import { RESULT_MARK, type ChildResult, type Task, type Workload } from './types.ts';

export type WorkloadFn = (task: Task) => Promise<ChildResult>;
export type SystemImpl = Partial<Record<Workload, WorkloadFn>>;

// ---- query counting -------------------------------------------------------------------------------

/**
 * Every query any `pg` client of this process sends (Tidings, pg-boss and graphile-worker all use the one
 * `pg` package installed), for the idle-cost measure. Clients of the harness itself opt out.
 */
let queriesSent = 0;
const SKIP = Symbol('bench-skip-count');
{
  const proto = pg.Client.prototype as unknown as { query: (...args: unknown[]) => unknown; [SKIP]?: boolean };
  const original = proto.query;
  proto.query = function patched(this: { [SKIP]?: boolean }, ...args: unknown[]) {
    if (this[SKIP] !== true) queriesSent++;
    return original.apply(this, args);
  };
}
export function queriesSoFar(): number {
  return queriesSent;
}

/** A client for the harness's own checks: not counted as the system's queries. */
export async function monitorClient(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url });
  (client as unknown as Record<symbol, boolean>)[SKIP] = true;
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

// ---- events ---------------------------------------------------------------------------------------

export interface BenchEvent {
  key: string;
  seq: number;
  payload: string;
}

const FILL = 'x'.repeat(210);
/** ~250 bytes of JSON. */
export function makeEvent(seq: number, keys: number): BenchEvent {
  return { key: keys > 0 ? `k${seq % keys}` : `k${seq}`, seq, payload: FILL };
}

// ---- counting and waiting -------------------------------------------------------------------------

/** Counts handled messages; `until(n)` resolves when the count reaches n. */
export class Counter {
  count = 0;
  #waiters: Array<{ n: number; resolve: () => void }> = [];
  add(k = 1): void {
    this.count += k;
    if (this.#waiters.length === 0) return;
    this.#waiters = this.#waiters.filter((w) => {
      if (this.count >= w.n) {
        w.resolve();
        return false;
      }
      return true;
    });
  }
  until(n: number, timeoutMs: number, what = 'messages'): Promise<void> {
    if (this.count >= n) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${n} ${what}; got ${this.count}`)), timeoutMs);
      this.#waiters.push({
        n,
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
      });
    });
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
export const now = () => performance.now();

/** Polls `check` every `everyMs` until it is true. */
export async function pollUntil(check: () => Promise<boolean>, timeoutMs: number, what: string, everyMs = 5): Promise<void> {
  const deadline = now() + timeoutMs;
  while (!(await check())) {
    if (now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    await sleep(everyMs);
  }
}

/** How much the producers publish: a number of events, or for a time (`ms`). */
export type Amount = number | { ms: number };

/**
 * Runs `producers` loops that each take the next sequence number, until `amount` events are taken or its
 * time is up (no call starts after it). Returns how many were taken.
 */
export async function produce(amount: Amount, producers: number, fn: (seq: number, producer: number) => Promise<unknown>): Promise<number> {
  const total = typeof amount === 'number' ? amount : Number.POSITIVE_INFINITY;
  const deadline = typeof amount === 'number' ? Number.POSITIVE_INFINITY : now() + amount.ms;
  let next = 0;
  await Promise.all(
    Array.from({ length: producers }, async (_, producer) => {
      while (next < total && now() < deadline) {
        const seq = next++;
        await fn(seq, producer);
      }
    }),
  );
  return next;
}

/**
 * What workloads 3 and 4 measure: `publishSeconds` of publishing, so that a fast system is measured over
 * tens of thousands of events rather than a few hundred milliseconds of its start (4,000 events: Tidings
 * 8.2k/s and BullMQ 10.3k/s standalone, where 16,000 gave 11.5k and 18.0k) and a slow one does not stretch
 * the run; or `events` events where the task says so (the producers-only row, sized like the raw floor's).
 */
export function measuredAmount(task: Task): Amount {
  return task.publishSeconds > 0 ? { ms: task.publishSeconds * 1_000 } : task.events;
}

/**
 * End to end (workloads 3 and 4): every system first runs events through for a third of the measured
 * time (or a quarter of the measured events), unmeasured, so the figures are those of a process whose hot
 * path V8 has compiled rather than of its first second (a fresh Tidings process did ~3k/s over its first
 * 4,000 events, ~5k/s over the next). The same for every system; none with `--quick`.
 */
function warmUpAmount(task: Task): Amount {
  return task.publishSeconds > 0 && !task.quick ? { ms: (task.publishSeconds * 1_000) / 3 } : warmUpEvents(task);
}

/** A quarter of the measured events (drain, and rows that publish a number of events); none with `--quick`. */
function warmUpEvents(task: Task): number {
  return task.quick ? 0 : Math.round(task.events / 4);
}

/**
 * Drain (workload 2): the measured drain follows an unmeasured one of a quarter of the events in the same
 * process, for the same reason (a fresh Tidings process drained 10,000 events at ~20k/s and 40,000 at
 * ~35k/s: its first few thousand run before V8 has compiled the hot path). `drain` must clean up after itself.
 */
export function warmedDrain(drain: WorkloadFn): WorkloadFn {
  return async (task) => {
    const warm = warmUpEvents(task);
    if (warm > 0) await drain({ ...task, events: warm });
    return drain(task);
  };
}

/** The warm-up's first sequence number: its keys (with `keys: 0`, one per event) are not the measured ones. */
const WARM_UP_FIRST = 1_000_000_000;

/**
 * Runs the warm-up: `publish` for each of its events (numbered apart from the measured ones); with a
 * consumer, waits until it has handled (`counter`) and acknowledged (`acknowledged(n)`) them all. Returns
 * their number.
 */

export async function warmUp(
  task: Task,
  producers: number,
  publish: (seq: number) => Promise<unknown>,
  consumer?: { counter: Counter; acknowledged: (n: number) => Promise<boolean> },
): Promise<number> {
  const amount = warmUpAmount(task);
  if (amount === 0) return 0;
  const n = await produce(amount, producers, (seq) => publish(WARM_UP_FIRST + seq));
  if (consumer !== undefined) {
    await consumer.counter.until(n, task.timeoutMs, 'warm-up messages');
    await pollUntil(() => consumer.acknowledged(n), 60_000, 'warm-up acknowledged');
  }
  return n;
}

// ---- statistics -----------------------------------------------------------------------------------

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

export const CHART_PERCENTILES = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 100];

// ---- CPU ------------------------------------------------------------------------------------------

const TICK_MS = 10; // CLK_TCK = 100 on Linux
const CORES = cpus().length;

function machineTicks(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  const fields = line.trim().split(/\s+/).slice(1).map(Number);
  const total = fields.reduce((a, b) => a + b, 0);
  const idle = (fields[3] ?? 0) + (fields[4] ?? 0);
  return { busy: total - idle, total };
}

/**
 * CPU ticks (user + system) of every process whose command is one of `names`. PostgreSQL backends serving
 * another database (another user of this shared machine) are left out; its background processes count.
 */
function serverTicks(names: readonly string[], database: string): number {
  let ticks = 0;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(stat.indexOf('(') + 1, close);
      if (!names.includes(comm)) continue;
      if (comm === 'postgres') {
        const title = readFileSync(`/proc/${entry}/cmdline`, 'utf8').replace(/\0/g, ' ').trim();
        const backend = /^postgres: [^:]+: \S+ (\S+) \S+\(\d+\)/.exec(title);
        if (backend !== null && backend[1] !== database) continue;
      }
      const rest = stat.slice(close + 2).split(' ');
      ticks += Number(rest[11]) + Number(rest[12]); // utime, stime (fields 14, 15)
    } catch {
      // the process ended meanwhile
    }
  }
  return ticks;
}

/** CPU used between start() and stop(), as % of all cores: the machine, this process, and the servers. */
export class CpuMeter {
  #t0 = 0;
  #machine = { busy: 0, total: 0 };
  #self = process.cpuUsage();
  #server = 0;
  constructor(
    private readonly servers: readonly string[],
    private readonly database: string,
  ) {}
  start(): void {
    this.#t0 = now();
    this.#machine = machineTicks();
    this.#self = process.cpuUsage();
    this.#server = serverTicks(this.servers, this.database);
  }
  stop(): { machine: number; node: number; server: number; nodeAndServer: number } {
    const wallMs = now() - this.#t0;
    const machine = machineTicks();
    const self = process.cpuUsage(this.#self);
    const server = serverTicks(this.servers, this.database) - this.#server;
    const pct = (ms: number) => (100 * ms) / (wallMs * CORES);
    const nodePct = pct((self.user + self.system) / 1000);
    const serverPct = pct(server * TICK_MS);
    return {
      machine: (100 * (machine.busy - this.#machine.busy)) / Math.max(1, machine.total - this.#machine.total),
      node: nodePct,
      server: serverPct,
      nodeAndServer: nodePct + serverPct,
    };
  }
}

// ---- latency phase ---------------------------------------------------------------------------------

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

/**
 * Queries per second a PostgreSQL system sends while idle: counted in this process (every `pg` query),
 * and transactions per second from pg_stat_database (which backends flush at most once a second, so
 * the window edges blur it a little).
 */
export async function idlePg(task: Task): Promise<Record<string, number>> {
  if (task.idleSeconds <= 0) return {};
  const monitor = await monitorClient(task.pgUrl);
  try {
    const xacts = async () => {
      const { rows } = await monitor.query<{ n: string }>('select xact_commit + xact_rollback as n from pg_stat_database where datname = $1', [task.database]);
      return Number(rows[0]?.n ?? 0);
    };
    // A backend that goes idle less than a second after its last stats flush defers the next one by
    // 10 s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL): wait that out, or the traffic just before would be
    // counted as idle transactions. Quick runs skip the server-side figure instead of waiting.
    const serverSide = !task.quick;
    await sleep(serverSide ? 11_000 : 1_500);
    await monitor.query('select pg_stat_clear_snapshot()');
    const x0 = await xacts();
    const q0 = queriesSoFar();
    const t0 = now();
    await sleep(task.idleSeconds * 1000);
    const q1 = queriesSoFar();
    const seconds = (now() - t0) / 1000;
    if (!serverSide) return { idleQueries: (q1 - q0) / seconds };
    await sleep(11_000); // the idle window's own transactions are flushed by then
    await monitor.query('select pg_stat_clear_snapshot()');
    const x1 = await xacts();
    // Over window + wait, less the monitor's own transactions (the reads and the clears).
    return { idleQueries: (q1 - q0) / seconds, idleXacts: Math.max(0, x1 - x0 - 3) / (seconds + 11) };
  } finally {
    await monitor.end();
  }
}

// ---- the child's main ------------------------------------------------------------------------------

export async function ensureEffectsTable(url: string): Promise<void> {
  const client = await monitorClient(url);
  try {
    await client.query('create table if not exists bench_effects (id text primary key, at timestamptz not null default now())');
    await client.query('truncate bench_effects');
  } finally {
    await client.end();
  }
}

export async function countEffects(url: string): Promise<number> {
  const client = await monitorClient(url);
  try {
    const { rows } = await client.query<{ n: string }>('select count(*) as n from bench_effects');
    return Number(rows[0]?.n ?? 0);
  } finally {
    await client.end();
  }
}

function emit(result: ChildResult): void {
  process.stdout.write(`\n${RESULT_MARK}${JSON.stringify(result)}\n`);
}

/** Entry point of a system's child process. */
export function runChild(impl: SystemImpl): void {
  const raw = process.argv[2];
  if (raw === undefined) {
    console.error('usage: node --import tsx bench/systems/<system>.ts <task json>');
    process.exit(2);
  }
  const task = JSON.parse(raw) as Task;
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

/** Throughput in events/s. */
export function rate(events: number, ms: number): number {
  return (events * 1000) / ms;
}
