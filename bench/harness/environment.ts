/** The run's environment (recorded with the figures) and the build of Tidings it measures. */
import { execFileSync } from 'node:child_process';
import { cpSync, readFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Redis } from 'ioredis';
import pg from 'pg';
import type { Sizes } from './plan.ts';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

function version(pkg: string): string {
  try {
    return (JSON.parse(readFileSync(join(root, 'node_modules', pkg, 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return 'not installed';
  }
}

export interface RunSettings {
  db: { url: string; name: string };
  quick: boolean;
  sizes: Sizes;
}

/** What the figures were measured on: machine, servers, versions, commit, and the run's settings. */
export async function environment({ db, quick, sizes }: RunSettings): Promise<Record<string, unknown>> {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  const model = /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1]?.trim() ?? 'unknown';
  const client = new pg.Client({ connectionString: db.url });
  await client.connect();
  const setting = async (name: string) => (await client.query<{ v: string }>(`select current_setting($1) as v`, [name])).rows[0]?.v;
  const pgInfo = {
    version: await setting('server_version'),
    synchronous_commit: await setting('synchronous_commit'),
    shared_buffers: await setting('shared_buffers'),
    fsync: await setting('fsync'),
    database: db.name,
  };
  await client.end();
  const redis = new Redis({ host: '127.0.0.1', port: 6379 });
  const info = await redis.info('server');
  const persistence = await redis.info('persistence');
  const save = (await redis.config('GET', 'save')) as string[];
  redis.disconnect();
  let commit = 'unknown';
  try {
    commit = readFileSync(join(root, '.git', 'HEAD'), 'utf8').trim();
    if (commit.startsWith('ref: ')) commit = readFileSync(join(root, '.git', commit.slice(5)), 'utf8').trim();
  } catch {
    // not a git checkout
  }
  let srcChanges: string[] = [];
  try {
    srcChanges = execFileSync('git', ['status', '--porcelain', '--', 'src'], { cwd: root, encoding: 'utf8' }).split('\n').filter(Boolean);
  } catch {
    // git unavailable
  }
  return {
    date: new Date().toISOString(),
    cpu: { model, count: cpus().length },
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    kernel: release(),
    node: process.version,
    postgres: pgInfo,
    redis: {
      version: /redis_version:(\S+)/.exec(info)?.[1],
      save: save[1] ?? '',
      aof: /aof_enabled:(\d)/.exec(persistence)?.[1] === '1',
    },
    versions: {
      tidings: (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version,
      'pg-boss': version('pg-boss'),
      'graphile-worker': version('graphile-worker'),
      bullmq: version('bullmq'),
      ioredis: version('ioredis'),
      pg: version('pg'),
    },
    commit,
    /** Uncommitted changes under src/ when the run started: the figures are of that working tree. */
    srcChanges,
    mode: quick ? 'quick' : 'default',
    rounds: sizes.rounds,
    sizes,
  };
}

/** Compiles src/ the way `npm run build` does, into the snapshot: what users run, without tsx's transform. */
export function buildSnapshot(snapshot: string): void {
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json'), '--outDir', snapshot, '--declaration', 'false', '--sourceMap', 'false'], {
    cwd: root,
    stdio: 'inherit',
  });
  cpSync(join(root, 'src', 'postgres', 'migrations'), join(snapshot, 'postgres', 'migrations'), { recursive: true });
}
