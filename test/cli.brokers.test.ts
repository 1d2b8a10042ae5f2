/**
 * The `tidings dead-letters` commands on the broker backbones: the same commands as on PostgreSQL, with an
 * amqp:// or nats:// URL. Real buses produce the dead letters; the real binary lists, shows, redrives
 * and drops them.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test, type TestContext } from 'node:test';
import { createBus, type Backbone, type Bus } from '../src/index.ts';
import { nats } from '../src/nats/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { NATS_URL, RABBITMQ_URL, requireBroker, runTidings, waitFor } from './helpers.ts';
import { natsNamespace, quickNats } from './fixtures/nats.ts';
import { deleteByPrefix, testOptions } from './fixtures/rabbitmq.ts';

const buses: Bus[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

interface Target {
  /** The CLI arguments that point at this backbone's dead letters. */
  args: string[];
  backbone(): Backbone;
}

async function rabbitTarget(t: TestContext): Promise<Target | undefined> {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return undefined;
  const prefix = `cli_${process.pid}_${Math.random().toString(36).slice(2, 8)}.`;
  cleanups.push(() => deleteByPrefix(prefix));
  return { args: ['--url', RABBITMQ_URL, '--prefix', prefix], backbone: () => rabbitmq(testOptions(prefix)) };
}

async function natsTarget(t: TestContext): Promise<Target | undefined> {
  const namespace = await natsNamespace(t, 'cli');
  if (namespace === undefined) return undefined;
  cleanups.push(() => namespace.cleanup());
  return { args: ['--url', NATS_URL, '--stream', namespace.stream], backbone: () => nats(namespace.options({ ...quickNats })) };
}

for (const [name, target] of [
  ['RabbitMQ', rabbitTarget],
  ['NATS', natsTarget],
] as const) {
  test(`${name}: dead letters are listed, shown, redriven and dropped with the same commands as on PostgreSQL`, async (t) => {
    const world = await target(t);
    if (world === undefined) return;
    const bus = createBus({ service: 'cli-test', backbone: world.backbone() });
    buses.push(bus);
    let healed = false;
    const handled: number[] = [];
    bus.subscribe(
      'cli-billing',
      Ticked,
      (message) => {
        if (!healed) throw new Error(`gateway timeout for ${message.data.key}`);
        handled.push(message.data.seq);
      },
      { retry: { immediate: 0, delayed: [], jitter: 0 } },
    );
    await bus.start();
    await bus.publishMany(
      Ticked,
      [1, 2, 3].map((seq) => ({ key: `k${seq}`, seq })),
    );
    const store = bus.backbone.deadLetters();
    await waitFor('three dead letters', async () => (await store.count({ all: true })) === 3, 20_000);

    const cli = async (...args: string[]) => {
      const run = await runTidings(['--json', 'dead-letters', ...args, ...world.args]);
      assert.equal(run.code, 0, `tidings dead-letters ${args.join(' ')} exited ${run.code}: ${run.stderr}`);
      return JSON.parse(run.stdout);
    };
    const listed = await cli('list');
    assert.equal(listed.total, 3);
    assert.deepEqual(
      listed.deadLetters.map((letter: { topic: string }) => letter.topic),
      ['test.ticked', 'test.ticked', 'test.ticked'],
    );
    assert.match(listed.deadLetters[0].reason, /gateway timeout/);
    const groups = await cli('list', '--group');
    assert.equal(groups.length, 1, 'one error, numbers masked: one group');
    assert.equal(groups[0].count, 3);
    const [shown] = await cli('show', listed.deadLetters[0].id);
    assert.equal(shown.subscription, 'cli-billing');
    assert.equal(shown.attempts.length, 1);
    assert.match(shown.attempts[0].error.message, /gateway timeout/);

    healed = true;
    const first = listed.deadLetters.find((letter: { key: string }) => letter.key === 'k1');
    const redriven = await cli('redrive', first.id);
    assert.equal(redriven.count, 1);
    await waitFor('the redriven message handled', () => handled.includes(1), 20_000);
    const dropped = await cli('drop', '--subscription', 'cli-billing');
    assert.equal(dropped.count, 2);
    assert.equal((await cli('list')).total, 0);
    assert.deepEqual(handled, [1], 'only the redriven message ran again');

    const refused = await runTidings(['dead-letters', 'drop', ...world.args]);
    assert.equal(refused.code, 2, 'a drop without a selection is a usage error');
  });
}

test('an unreachable broker exits with code 3 and names it', async () => {
  const run = await runTidings(['dead-letters', 'list', '--url', 'amqp://guest:secret@127.0.0.1:1', '--connect-timeout', '2']);
  assert.equal(run.code, 3, run.stderr);
  assert.match(run.stderr, /127\.0\.0\.1:1/);
  assert.doesNotMatch(run.stderr, /secret/, 'the password is not printed');
});

test('stamps on brokers: a RabbitMQ prefix and a NATS stream as two tenants, counted and dropped per tenant', async (t) => {
  const rabbit = await rabbitTarget(t);
  const jet = await natsTarget(t);
  if (rabbit === undefined || jet === undefined) return;
  const produce = async (world: Target, count: number) => {
    const bus = createBus({ service: 'cli-stamps', backbone: world.backbone() });
    buses.push(bus);
    bus.subscribe(
      'cli-billing',
      Ticked,
      () => {
        throw new Error('always fails');
      },
      { retry: { immediate: 0, delayed: [], jitter: 0 } },
    );
    await bus.start();
    await bus.publishMany(
      Ticked,
      Array.from({ length: count }, (_, i) => ({ key: `k${i}`, seq: i + 1 })),
    );
    const store = bus.backbone.deadLetters();
    await waitFor(`${count} dead letters`, async () => (await store.count({ all: true })) === count, 20_000);
  };
  await Promise.all([produce(rabbit, 2), produce(jet, 3)]);

  const dir = mkdtempSync(join(tmpdir(), 'tidings-cli-broker-stamps-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const config = join(dir, 'tidings.config.json');
  // The targets' arguments are --url <url> and --prefix or --stream <value>: a stamp's settings.
  const stampOf = ([, url, option, value]: string[]) => ({ url, [option!.slice(2)]: value });
  writeFileSync(config, JSON.stringify({ stamps: { acme: stampOf(rabbit.args), globex: stampOf(jet.args) } }));
  const cli = (...args: string[]) => runTidings(['--config', config, '--json', ...args]);

  const counted = await cli('dead-letters', 'count');
  assert.equal(counted.code, 0, counted.stderr);
  assert.deepEqual(JSON.parse(counted.stdout), { acme: 2, globex: 3 });
  const listed = await cli('dead-letters', 'list');
  assert.equal(listed.code, 0, listed.stderr);
  const lists = JSON.parse(listed.stdout);
  assert.deepEqual([lists.acme.total, lists.globex.total], [2, 3]);

  const refused = await cli('dead-letters', 'drop', '--all');
  assert.equal(refused.code, 2, 'a drop on every stamp is refused');
  assert.match(refused.stderr, /name one with --stamp <tenant>/);
  const dropped = await cli('--stamp', 'globex', 'dead-letters', 'drop', '--all');
  assert.equal(dropped.code, 0, dropped.stderr);
  assert.equal(JSON.parse(dropped.stdout).count, 3);
  assert.deepEqual(JSON.parse((await cli('dead-letters', 'count')).stdout), { acme: 2, globex: 0 }, "only globex's dead letters were dropped");
});
