/**
 * The NATS backbone when a process dies. The server: a nats-server of this test's own (its own port and store,
 * so other tests on the shared server are not disturbed) is killed with -9 while messages are published and
 * consumed, then restarted on the same store; nothing published is lost, and publishes during the outage fail
 * fast with a retryable BACKBONE_UNAVAILABLE (or succeed), never hang. A consumer: a worker process
 * (test/fixtures/nats-worker.ts) is killed with -9 while a key waits for its delayed retry; the next owner
 * retries it on time, with its history, before the key's later messages.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, connect as tcpConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { connect as natsConnect } from 'nats';
import { createBus, newId, TidingsError } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { NATS_URL, sleep, waitFor } from './helpers.ts';
import { natsNamespace, quickNats } from './fixtures/nats.ts';

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
  await waitFor(
    `nats-server on port ${port}`,
    () =>
      new Promise<boolean>((resolve) => {
        const socket = tcpConnect({ host: '127.0.0.1', port });
        socket.once('connect', () => {
          socket.end();
          resolve(true);
        });
        socket.once('error', () => resolve(false));
      }),
    10_000,
  );
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
            assert.ok(
              error instanceof TidingsError && error.code === 'BACKBONE_UNAVAILABLE' && error.retryable,
              `a retryable BACKBONE_UNAVAILABLE, got ${String(error)}`,
            );
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
    t.diagnostic(
      `${total} published, ${failures} publish attempts failed during the outage, slowest publish call ${slowest} ms, ${duplicates} handled twice (at least once)`,
    );
    assert.equal(published.length, total);
    assert.ok(failures > 0, 'some publishes met the outage');
    assert.ok(slowest < quickNats.publishTimeoutMs + 2_000, `no publish hung (slowest ${slowest} ms)`);
  } finally {
    await bus.stop();
  }
});

test("a consumer killed with -9 while a key waits for its delayed retry: the next owner retries it on time, with its history, before the key's later messages", async (t) => {
  const ns = await natsNamespace(t, 'k');
  if (ns === undefined) return;
  after(() => ns.cleanup());
  const retryMs = 6_000; // longer than a bucket takes to change hands (leaseMs 2,500 + a heartbeat)
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', 'test/fixtures/nats-worker.ts'], {
    env: { ...process.env, NATS_URL, STREAM: ns.stream, SUBJECT_PREFIX: ns.subjectPrefix, RETRY_MS: String(retryMs) },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const childLines: string[] = [];
  createInterface({ input: child.stdout! }).on('line', (line) => childLines.push(line));
  await waitFor('the worker process', () => childLines.includes('ready'), 20_000);

  const publisher = createBus({ service: 'faults', backbone: nats(ns.options()) });
  after(() => publisher.stop());
  await publisher.start();
  await publisher.publish(Ticked, { key: 'k', seq: 0, note: 'fail' });
  await publisher.publishMany(
    Ticked,
    [1, 2, 3, 4].map((seq) => ({ key: 'k', seq })),
  );
  await publisher.publishMany(
    Ticked,
    [0, 1, 2, 3, 4].map((seq) => ({ key: 'o', seq })),
  );
  await waitFor(
    'the first attempt, and the other key flowing',
    () => childLines.includes('failed k:0 attempt 1') && childLines.includes('handled o:4 attempt 1'),
  );

  // Killed once its hold is written: the wait for the retry is all there is left of k:0 in this process.
  const nc = await natsConnect({ servers: NATS_URL });
  after(() => nc.close());
  const holds = await nc.jetstream().views.kv(`${ns.stream}_holds`);
  let dueAt = 0;
  await waitFor('the durable hold of k:0', async () => {
    for await (const key of await holds.keys('held.*.*')) dueAt = (await holds.get(key))!.json<{ dueAt: number }>().dueAt;
    return dueAt > 0;
  });
  child.kill('SIGKILL');
  await new Promise((resolve) => child.once('exit', resolve));
  assert.ok(!childLines.some((line) => / k:[1-4] /.test(line)), "the key's later messages waited in the killed worker");

  const handled: Array<{ id: string; attempt: number; at: number }> = [];
  const next = createBus({ service: 'faults', backbone: nats(ns.options()) });
  after(() => next.stop());
  next.subscribe(
    'held',
    Ticked,
    (message, ctx) => {
      handled.push({ id: `${message.data.key}:${message.data.seq}`, attempt: ctx.attempt, at: Date.now() });
      if (message.data.note === 'fail') throw new Error(`refused by the next owner at attempt ${ctx.attempt}`);
    },
    { retry: { immediate: 0, delayed: [retryMs], jitter: 0 } },
  );
  await next.start();
  await waitFor("the key's later messages on the next owner", () => handled.some((h) => h.id === 'k:4'), 30_000);
  const retried = handled.filter((h) => h.id === 'k:0');
  assert.equal(retried.length, 1, 'k:0 tried once more, its retry not lost nor run twice');
  assert.equal(retried[0]!.attempt, 2, 'counted as the second attempt');
  assert.ok(retried[0]!.at >= dueAt - 50, `not before its time (${dueAt - retried[0]!.at} ms early)`);
  assert.ok(retried[0]!.at <= dueAt + 2_000, `on time (${retried[0]!.at - dueAt} ms late)`);
  const later = handled.filter((h) => /^k:[1-4]$/.test(h.id));
  assert.deepEqual(
    later.map((h) => h.id),
    ['k:1', 'k:2', 'k:3', 'k:4'],
    'each of the later messages once, in order',
  );
  assert.ok(
    later.every((h) => h.at >= retried[0]!.at),
    'none before the retry of k:0',
  );

  const store = next.backbone.deadLetters();
  await waitFor('the dead letter of k:0', async () => (await store.count({ subscription: 'held' })) === 1);
  const [letter] = await store.show((await store.list({ subscription: 'held' })).deadLetters[0]!.messageId);
  assert.deepEqual(
    letter!.attempts.map((a) => a.attempt),
    [1, 2],
    'the history kept across the crash',
  );
  assert.match(letter!.attempts[0]!.error.message, new RegExp(`refused by process ${child.pid} at attempt 1`));
  assert.match(letter!.attempts[1]!.error.message, /refused by the next owner at attempt 2/);
  await waitFor('the hold deleted', async () => {
    for await (const _ of await holds.keys('held.*.*')) return false;
    return true;
  });
});
