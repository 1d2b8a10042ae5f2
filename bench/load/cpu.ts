/** CPU used during a phase: the machine's (/proc/stat), this process's, and the servers' processes. */
import { readdirSync, readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { now } from './measure.ts';

const TICK_MS = 10; // CLK_TCK = 100 on Linux
const CORES = cpus().length;

/** Busy and total ticks of all cores since boot (/proc/stat). */
export function machineTicks(): { busy: number; total: number } {
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

/** CPU ticks (user + system) of the processes `pids` (the producers' process of a two-process row). */
function pidTicks(pids: readonly number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(rest[11]) + Number(rest[12]);
    } catch {
      // ended meanwhile
    }
  }
  return ticks;
}

/**
 * CPU used between start() and stop(), as % of all cores: the machine, Node (this process and the other
 * processes of the system under test, `others`), and the servers.
 */
export class CpuMeter {
  #t0 = 0;
  #machine = { busy: 0, total: 0 };
  #self = process.cpuUsage();
  #others = 0;
  #server = 0;
  constructor(
    private readonly servers: readonly string[],
    private readonly database: string,
    private readonly others: readonly number[] = [],
  ) {}
  start(): void {
    this.#t0 = now();
    this.#machine = machineTicks();
    this.#self = process.cpuUsage();
    this.#others = pidTicks(this.others);
    this.#server = serverTicks(this.servers, this.database);
  }
  stop(): { machine: number; node: number; server: number; nodeAndServer: number } {
    const wallMs = now() - this.#t0;
    const machine = machineTicks();
    const self = process.cpuUsage(this.#self);
    const others = pidTicks(this.others) - this.#others;
    const server = serverTicks(this.servers, this.database) - this.#server;
    const pct = (ms: number) => (100 * ms) / (wallMs * CORES);
    const nodePct = pct((self.user + self.system) / 1000 + others * TICK_MS);
    const serverPct = pct(server * TICK_MS);
    return {
      machine: (100 * (machine.busy - this.#machine.busy)) / Math.max(1, machine.total - this.#machine.total),
      node: nodePct,
      server: serverPct,
      nodeAndServer: nodePct + serverPct,
    };
  }
}
