import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { connect as tcpConnect } from 'node:net';
import type { TestContext } from 'node:test';
import pg from 'pg';

/** The PostgreSQL server the tests use: DATABASE_URL, or the local one CI starts. */
export const DATABASE_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';

let reachable: Promise<string | undefined> | undefined;

/** Undefined when the server answers, else why not. */
function probe(): Promise<string | undefined> {
  reachable ??= (async () => {
    const client = new pg.Client({ connectionString: DATABASE_URL, connectionTimeoutMillis: 3_000 });
    try {
      await client.connect();
      await client.query('select 1');
      return undefined;
    } catch (error) {
      return (error as Error).message;
    } finally {
      await client.end().catch(() => undefined);
    }
  })();
  return reachable;
}

/**
 * Skips the test when PostgreSQL is unreachable on a developer's machine; under CI=true an unreachable
 * server fails the test instead, so a broken CI never passes by skipping.
 */
export async function requirePostgres(t: TestContext): Promise<boolean> {
  const problem = await probe();
  if (problem === undefined) return true;
  const message = `PostgreSQL at ${DATABASE_URL.replace(/:[^:@/]*@/, '@')} is unreachable (${problem}); start it or set DATABASE_URL`;
  if (process.env.CI === 'true') assert.fail(message);
  t.skip(message);
  return false;
}

/** The brokers the tests use: RABBITMQ_URL and NATS_URL, or the local ones CI starts. */
export const RABBITMQ_URL = process.env.RABBITMQ_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
export const NATS_URL = process.env.NATS_URL ?? 'nats://127.0.0.1:4222';

const brokerProbes = new Map<string, Promise<string | undefined>>();

/** Like requirePostgres, for a broker: skips when its port does not answer, fails under CI=true. */
export async function requireBroker(t: TestContext, name: 'RabbitMQ' | 'NATS', url: string): Promise<boolean> {
  const { hostname, port } = new URL(url);
  const address = `${hostname}:${port}`;
  let probe = brokerProbes.get(address);
  if (probe === undefined) {
    probe = new Promise((resolve) => {
      const socket = tcpConnect({ host: hostname, port: Number(port) });
      socket.setTimeout(3_000, () => socket.destroy(new Error('no answer within 3 s')));
      socket.once('connect', () => {
        socket.end();
        resolve(undefined);
      });
      socket.once('error', (error) => resolve(error.message));
    });
    brokerProbes.set(address, probe);
  }
  const problem = await probe;
  if (problem === undefined) return true;
  const message = `${name} at ${address} is unreachable (${problem}); start it (see .ci/run) or set ${name === 'NATS' ? 'NATS_URL' : 'RABBITMQ_URL'}`;
  if (process.env.CI === 'true') assert.fail(message);
  t.skip(message);
  return false;
}

/** A schema of its own for each test, dropped afterwards. */
export function uniqueSchema(prefix = 't'): string {
  return `${prefix}_${process.pid}_${Math.random().toString(36).slice(2, 8)}`;
}

export async function dropSchema(schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: DATABASE_URL });
  await client.connect();
  try {
    await client.query(`drop schema if exists "${schema}" cascade`);
  } finally {
    await client.end();
  }
}

/** A plain client for the test's own SQL. */
export async function connect(): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: DATABASE_URL });
  await client.connect();
  return client;
}

/** One statement on a connection of its own: its rows. */
// biome-ignore lint/suspicious/noExplicitAny: each test reads its own rows
export async function sql<R = any>(text: string, params: unknown[] = []): Promise<R[]> {
  const client = await connect();
  try {
    return (await client.query(text, params)).rows as R[];
  } finally {
    await client.end();
  }
}

/** Waits until `condition` holds, checking often; fails with `what` after `timeoutMs`. */
export async function waitFor(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) assert.fail(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The table the multi-process tests count effects in: one row per handling committed through ctx.tx. */
export async function createEffects(schema: string): Promise<void> {
  const client = await connect();
  try {
    // The bus creates the schema on start; the effects table lives beside it.
    await client.query(`create schema if not exists "${schema}"`);
    await client.query(
      `create table "${schema}".effects (n bigserial primary key, message_id text not null, key text not null, seq int not null, worker int not null)`,
    );
  } finally {
    await client.end();
  }
}

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

export const BIN = new URL('../bin/tidings.js', import.meta.url).pathname;

/**
 * Runs the real `tidings` binary in a child process, as an operator would. A run still going after 30 s is
 * killed and reported with exit code null, so a command that never ends fails its test instead of hanging it.
 */
export function runTidings(args: readonly string[], env: NodeJS.ProcessEnv = process.env): Promise<CliRun> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], { env, stdio: 'pipe' });
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, ms: Date.now() - started });
    });
  });
}
