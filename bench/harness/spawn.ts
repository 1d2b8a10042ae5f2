/** Every task is a fresh child process: which file runs each system, and the spawning with its watchdog. */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { machineTicks } from '../load/cpu.ts';
import { type ChildResult, RESULT_MARK, type SystemName, type Task } from '../protocol.ts';

const bench = join(dirname(fileURLToPath(import.meta.url)), '..');
const root = join(bench, '..');

/** The child file of each system, under bench/: Tidings variants, peers, baselines. */
export const SYSTEM_FILES: Record<SystemName, string> = {
  tidings: 'tidings/postgres.ts',
  rabbitmq: 'tidings/rabbitmq.ts',
  nats: 'tidings/nats.ts',
  replica: 'tidings/replica.ts',
  pgboss: 'peers/pgboss.ts',
  graphile: 'peers/graphile.ts',
  bullmq: 'peers/bullmq.ts',
  amqp: 'peers/amqp.ts',
  natsjs: 'peers/natsjs.ts',
  raw: 'baselines/raw.ts',
  http: 'baselines/request-reply.ts',
  natscore: 'baselines/request-reply.ts',
  tenancy: 'tidings/postgres.ts',
};

/**
 * Runs one task in a fresh child process and returns its result line; a watchdog ends a child that hangs.
 * `snapshot` is the compiled build of Tidings the children import (bench/tidings/build.ts).
 */
export function runTask(task: Task, snapshot: string): Promise<ChildResult> {
  const file = join(bench, SYSTEM_FILES[task.system]);
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', file, JSON.stringify(task)], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NODE_NO_WARNINGS: '1', TIDINGS_BUILD: snapshot },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    child.stderr.on('data', (chunk: Buffer) => {
      stderr = (stderr + chunk.toString()).slice(-8_000);
    });
    const killer = setTimeout(() => child.kill('SIGKILL'), task.timeoutMs + 20_000);
    child.on('close', (code, signal) => {
      clearTimeout(killer);
      const line = stdout.split('\n').find((l) => l.startsWith(RESULT_MARK));
      if (line !== undefined) {
        const result = JSON.parse(line.slice(RESULT_MARK.length)) as ChildResult;
        if (!result.ok && stderr.trim() !== '') result.error = `${result.error ?? ''}\n--- stderr ---\n${stderr.trim()}`;
        resolve(result);
        return;
      }
      resolve({ ok: false, error: `child exited with ${code ?? signal} and no result\n${stderr.trim()}`, metrics: {} });
    });
  });
}

/** Share of the machine's CPU busy over `ms` before a task: other work on this shared machine. */
export async function backgroundLoad(ms: number): Promise<number> {
  const a = machineTicks();
  await new Promise((resolve) => setTimeout(resolve, ms));
  const b = machineTicks();
  return (100 * (b.busy - a.busy)) / Math.max(1, b.total - a.total);
}
