/**
 * Stopping: bus.stop() is one shared promise (two callers at once, as a SIGINT and a SIGTERM handler or a
 * framework hook and the application's own, do not end the pool twice), and bus.stopOnSignals() stops the
 * bus gracefully on SIGINT/SIGTERM, so the message in flight is finished and acknowledged and its lease is
 * released instead of waited out.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test, type TestContext } from 'node:test';
import { createBus } from '../src/index.ts';
import { postgres, readStatus } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import pg from 'pg';
import { createEffects, DATABASE_URL, waitFor } from './helpers.ts';
import { pgWorld } from './fixtures/bus.ts';

async function setup(t: TestContext): Promise<string | undefined> {
  return (await pgWorld(t, 'life'))?.schema;
}

test('bus.stop() twice at once, and a backbone closed twice at once: one shared stop, no error', async (t) => {
  const schema = await setup(t);
  if (schema === undefined) return;
  const bus = createBus({ service: 'twice', backbone: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined }) });
  bus.subscribe('twice', Ticked, () => undefined);
  await bus.start();
  await bus.publish(Ticked, { key: 'k', seq: 1 });
  const first = bus.stop();
  assert.equal(bus.stop(), first, 'the same promise');
  await Promise.all([first, bus.stop()]);
  await bus.stop();

  const backbone = postgres({ url: DATABASE_URL, schema, onWarning: () => undefined });
  await backbone.open();
  await Promise.all([backbone.close(), backbone.close()]);
});

test('stop() during start(): the start completes or gives up, nothing is left running', async (t) => {
  const schema = await setup(t);
  if (schema === undefined) return;
  const bus = createBus({ service: 'early', backbone: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined }) });
  bus.subscribe('early', Ticked, () => undefined);
  const starting = bus.start();
  await bus.stop();
  await starting;
  const status = await withClient((client) => readStatus(client, { schema }));
  assert.ok(
    status.subscriptions.every((sub) => sub.cursors.every((cursor) => cursor.owner === null)),
    'no lease held',
  );
  await assert.rejects(bus.start(), /This bus was stopped/);
});

/** A small pool: readStatus sends its statements at once. */
async function withClient<T>(fn: (db: pg.Pool) => Promise<T>): Promise<T> {
  const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 4 });
  try {
    return await fn(pool);
  } finally {
    await pool.end();
  }
}

interface Exit {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Starts the fixture, waits until its handler runs, sends `signal`, and returns how the process ended. */
async function signalMidHandler(schema: string, signal: NodeJS.Signals, env: Record<string, string> = {}): Promise<Exit & { ms: number }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/fixtures/stop-on-signals.ts'], {
    env: { ...process.env, DATABASE_URL, SCHEMA: schema, HANDLE_MS: '1500', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<Exit>((resolve) => child.once('exit', (code, sig) => resolve({ code, signal: sig, stdout, stderr })));
  const killer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  try {
    await waitFor('the worker to be ready', () => stdout.includes('ready\n'), 30_000);
    const bus = createBus({ service: 'publisher', backbone: postgres({ url: DATABASE_URL, schema, onWarning: () => undefined }) });
    await bus.publish(Ticked, { key: 'k', seq: 1 });
    await bus.stop();
    await waitFor('the handler to run', () => stdout.includes('handling 1\n'), 30_000);
    const sent = Date.now();
    child.kill(signal);
    const exit = await exited;
    return { ...exit, stdout, stderr, ms: Date.now() - sent };
  } finally {
    clearTimeout(killer);
  }
}

test('stopOnSignals: SIGINT mid-handler finishes and acknowledges it, releases the leases, then ends the process by SIGINT', async (t) => {
  const schema = await setup(t);
  if (schema === undefined) return;
  await createEffects(schema);
  const exit = await signalMidHandler(schema, 'SIGINT');
  assert.equal(exit.signal, 'SIGINT', `ended by the signal, as without a handler (code ${exit.code}, stderr ${exit.stderr})`);
  assert.match(exit.stderr, /\[tidings\] SIGINT: stopping the bus gracefully \(SIGINT again exits at once\)/);
  assert.ok(exit.ms < 10_000, `stopped in ${exit.ms} ms`);

  const [effects, status] = await withClient(async (client) => [
    (await client.query(`select count(*)::int as n from "${schema}".effects`)).rows[0].n as number,
    await readStatus(client, { schema, subscription: 'on-signals' }),
  ]);
  assert.equal(effects, 1, 'the handler in flight finished and its write committed');
  const [sub] = status.subscriptions;
  assert.equal(sub!.lag, 0, 'and its message was acknowledged');
  assert.ok(
    sub!.cursors.every((cursor) => cursor.owner === null),
    'every lease released, nothing to wait out',
  );
});

test('stopOnSignals: when the application listens to SIGTERM too, the bus stops and the process ends on its own', async (t) => {
  const schema = await setup(t);
  if (schema === undefined) return;
  await createEffects(schema);
  const exit = await signalMidHandler(schema, 'SIGTERM', { ALSO_LISTEN: 'SIGTERM' });
  assert.equal(exit.signal, null, 'not raised again: the application decides');
  assert.equal(exit.code, 0, exit.stderr);
  assert.match(exit.stdout, /the application saw SIGTERM/);
  assert.match(exit.stderr, /\[tidings\] SIGTERM: stopping the bus gracefully/);
  const effects = await withClient(async (client) => (await client.query(`select count(*)::int as n from "${schema}".effects`)).rows[0].n as number);
  assert.equal(effects, 1);
});
