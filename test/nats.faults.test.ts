/**
 * The NATS backbone when the server dies: a nats-server of this test's own (its own port and store, so other
 * tests on the shared server are not disturbed) is killed with -9 while messages are published and consumed,
 * then restarted on the same store. Nothing published is lost; publishes during the outage fail fast with a
 * retryable BACKBONE_UNAVAILABLE (or succeed), never hang.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect as tcpConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { createBus, newId, TidingsError } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { sleep, waitFor } from './helpers.ts';
import { quickNats } from './nats.helpers.ts';

const NATS_SERVER = process.env.NATS_SERVER_BIN ?? '/usr/sbin/nats-server';

let server: ChildProcess | undefined;
const dir = mkdtempSync(join(tmpdir(), 'tidings-nats-'));
after(async () => {
  // Removed once the server has exited: one still shutting down writes into the directory being removed.
  if (server !== undefined && server.exitCode === null && server.signalCode === null) {
    const exited = new Promise((resolve) => server!.once('exit', resolve));
    server.kill('SIGTERM');
    await exited;
  }
  rmSync(dir, { recursive: true, force: true, maxRetries: 5 });
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

async function startServer(port: number): Promise<ChildProcess> {
  const child = spawn(NATS_SERVER, ['-a', '127.0.0.1', '-p', String(port), '-js', '-sd', dir], { stdio: 'ignore' });
  await waitFor(`nats-server on port ${port}`, () =>
    new Promise<boolean>((resolve) => {
      const socket = tcpConnect({ host: '127.0.0.1', port });
      socket.once('connect', () => {
        socket.end();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    }),
  10_000);
  return child;
}

test('nats-server killed with -9 and restarted mid-stream: nothing lost, publishes fail fast and retry', async (t) => {
  if (!existsSync(NATS_SERVER)) {
    if (process.env.CI === 'true') assert.fail(`nats-server not found at ${NATS_SERVER}; set NATS_SERVER_BIN`);
    return t.skip(`nats-server not found at ${NATS_SERVER}; set NATS_SERVER_BIN`);
  }
  const port = await freePort();
  server = await startServer(port);
  const url = `nats://127.0.0.1:${port}`;
  const bus = createBus({ service: 'faults', backbone: nats({ servers: url, ...quickNats }) });
  const seen = new Map<string, number>();
  bus.subscribe(
    'survivor',
    Ticked,
    async (message) => {
      seen.set(message.id, (seen.get(message.id) ?? 0) + 1);
      await sleep(1);
    },
    { concurrency: 16 },
  );
  await bus.start();
  try {
    const total = 600;
    const published: string[] = [];
    let failures = 0;
    let slowest = 0;
    let killed = false;
    const publishing = (async () => {
      for (let i = 0; i < total; i++) {
        const id = newId();
        // The same id on every try: JetStream keeps one copy of a publish that did land before its error.
        for (;;) {
          const began = Date.now();
          try {
            await bus.publish(Ticked, { key: `k${i % 40}`, seq: i }, { id });
            break;
          } catch (error) {
            failures++;
            assert.ok(error instanceof TidingsError && error.code === 'BACKBONE_UNAVAILABLE' && error.retryable, `a retryable BACKBONE_UNAVAILABLE, got ${String(error)}`);
            await sleep(100);
          } finally {
            slowest = Math.max(slowest, Date.now() - began);
          }
        }
        published.push(id);
        if (i % 20 === 0) await sleep(5);
      }
    })();
    await waitFor('some progress before the kill', () => seen.size >= 150, 20_000);
    server.kill('SIGKILL');
    killed = true;
    await new Promise((resolve) => server!.once('exit', resolve));
    await sleep(1_000);
    server = await startServer(port);
    await publishing;
    assert.ok(killed);
    await waitFor('every published message after the restart', () => published.every((id) => seen.has(id)), 45_000);
    const duplicates = [...seen.values()].filter((n) => n > 1).length;
    t.diagnostic(`${total} published, ${failures} publish attempts failed during the outage, slowest publish call ${slowest} ms, ${duplicates} handled twice (at least once)`);
    assert.equal(published.length, total);
    assert.ok(failures > 0, 'some publishes met the outage');
    assert.ok(slowest < quickNats.publishTimeoutMs + 2_000, `no publish hung (slowest ${slowest} ms)`);
  } finally {
    await bus.stop();
  }
});
