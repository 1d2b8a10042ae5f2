/**
 * The `tidings` CLI, driven as an operator would: the real binary (node bin/tidings.js) in a child
 * process, against a real PostgreSQL server, with real buses producing the dead letters, lag and leases.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { loadMigrations } from '../src/postgres/migrate.ts';
import { hostname, userInfo } from 'node:os';
import { test } from 'node:test';
import { pgWorld, type PgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { BIN, DATABASE_URL, requirePostgres, runTidings, sql, waitFor, type CliRun } from './helpers.ts';

/** Runs `tidings <args>` with DATABASE_URL set. */
function tidings(args: readonly string[], options: { env?: NodeJS.ProcessEnv } = {}): Promise<CliRun> {
  return runTidings(args, options.env ?? { ...process.env, DATABASE_URL });
}

/** `tidings --schema <schema> --json <args>`, expecting success, parsed. */
// biome-ignore lint/suspicious/noExplicitAny: each test reads the JSON shape of its own command
async function json<T = any>(schema: string, args: readonly string[]): Promise<T> {
  const run = await tidings(['--schema', schema, '--json', ...args]);
  assert.equal(run.code, 0, `tidings ${args.join(' ')} exited ${run.code}: ${run.stderr}`);
  return JSON.parse(run.stdout) as T;
}

/** Dead letters of `subscription`: a bus whose handler always fails, no retries, then stopped. */
async function makeDeadLetters(world: PgWorld, subscription: string, messages: Array<{ key: string; seq: number; note?: string }>): Promise<string[]> {
  const { schema } = world;
  const bus = world.bus('cli-test');
  bus.subscribe(
    subscription,
    Ticked,
    (message) => {
      throw new Error(`${message.data.key}:${message.data.seq} always fails`);
    },
    { retry: { immediate: 0, delayed: [] }, partitions: 2 },
  );
  await bus.start();
  const published = await bus.publishMany(Ticked, messages);
  await waitFor(`${messages.length} dead letters of ${subscription}`, async () => {
    const [row] = await sql(`select count(*)::int as n from "${schema}".dead_letters where subscription = $1`, [subscription]);
    return row.n === messages.length;
  });
  await bus.stop();
  return published.map((message) => message.id);
}

test('dead letters: list, group, show; redrive to a running bus handles each once, in per-key order, with its original id', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const messages = Array.from({ length: 20 }, (_, i) => ({ key: `k${i % 5}`, seq: Math.floor(i / 5) + 1 }));
  const ids = await makeDeadLetters(world, 'billing', messages);

  const listed = await json(schema, ['dead-letters', 'list', '--subscription', 'billing']);
  assert.equal(listed.total, 20);
  assert.deepEqual(new Set(listed.deadLetters.map((row: { messageId: string }) => row.messageId)), new Set(ids));
  assert.equal(listed.deadLetters[0].attempts, 1);
  assert.match(listed.deadLetters[0].reason, /failed 1 attempt; last error: k\d:\d always fails/);

  const groups = await json(schema, ['dead-letters', 'list', '--group']);
  assert.deepEqual(
    groups.map((group: { subscription: string; pattern: string; count: number }) => [group.subscription, group.pattern, group.count]),
    [['billing', 'failed N attempt; last error: kN:N always fails', 20]],
    'one error on many messages is one group',
  );
  const narrowed = await json(schema, ['dead-letters', 'list', '--error', 'K2:3 ALWAYS']);
  assert.equal(narrowed.total, 1, '--error matches text in any case');

  const [shown, ...more] = await json(schema, ['dead-letters', 'show', listed.deadLetters[0].id]);
  assert.equal(more.length, 0);
  assert.equal(shown.messageId, listed.deadLetters[0].messageId);
  assert.equal(shown.envelope.id, shown.messageId);
  assert.deepEqual(Object.keys(shown.envelope.data).sort(), ['key', 'seq']);
  assert.equal(shown.attempts.length, 1);
  assert.ok(shown.attempts[0].error.stack.includes('cli.pg.test.ts'), 'show gives the stack of each attempt');
  const human = await tidings(['--schema', schema, 'dead-letters', 'show', shown.messageId]);
  assert.equal(human.code, 0, human.stderr);
  assert.match(human.stdout, /Attempts \(1\):\n {2}#1 at .*: Error: k\d:\d always fails\n {6}at /);
  const missing = await tidings(['--schema', schema, 'dead-letters', 'show', '999999']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /No dead letter 999999.*tidings dead-letters list/);

  // The handler is fixed: a running bus takes the redriven messages back.
  const handled: Array<{ id: string; key: string; seq: number }> = [];
  const fixed = world.bus('cli-test');
  fixed.subscribe(
    'billing',
    Ticked,
    (message) => {
      handled.push({ id: message.id, key: message.data.key, seq: message.data.seq });
    },
    { retry: { immediate: 0, delayed: [] }, partitions: 2 },
  );
  await fixed.start();

  const nothing = await tidings(['--schema', schema, 'dead-letters', 'redrive']);
  assert.equal(nothing.code, 2, 'a redrive that names no dead letters is a usage error');
  assert.match(nothing.stderr, /Say which dead letters to redrive/);
  const dry = await json(schema, ['dead-letters', 'redrive', '--subscription', 'billing', '--dry-run']);
  assert.equal(dry.matched, 20);
  assert.equal((await sql(`select count(*)::int as n from "${schema}".dead_letters`))[0].n, 20, 'a dry run changes nothing');

  const redrive = await tidings(['--schema', schema, '--json', 'dead-letters', 'redrive', '--subscription', 'billing', '--rate', '8', '--actor', 'ops-test']);
  assert.equal(redrive.code, 0, redrive.stderr);
  const result = JSON.parse(redrive.stdout);
  assert.equal(result.count, 20);
  assert.deepEqual(result.bySubscription, { billing: 20 });
  // 8 per second: chunks of 8, 8 and 4, the second and third a second apart.
  assert.ok(redrive.ms >= 2_000, `--rate 8 spread 20 messages over at least 2 s (took ${redrive.ms} ms)`);

  await waitFor('the 20 redriven messages handled', () => handled.length >= 20, 15_000);
  await waitFor('held drained', async () => (await sql(`select count(*)::int as n from "${schema}".held`))[0].n === 0);
  assert.equal(handled.length, 20, 'each handled once');
  assert.deepEqual(new Set(handled.map((message) => message.id)), new Set(ids), 'with their original ids');
  for (let k = 0; k < 5; k++) {
    assert.deepEqual(
      handled.filter((message) => message.key === `k${k}`).map((message) => message.seq),
      [1, 2, 3, 4],
      `key k${k} in order`,
    );
  }
  assert.equal((await sql(`select count(*)::int as n from "${schema}".dead_letters`))[0].n, 0, 'redriven dead letters are gone');
  const audit = await sql(`select action, actor, subscription, message_ids, count from "${schema}".dead_letter_actions order by id`);
  assert.equal(audit.length, 3, 'one audit row per chunk');
  assert.ok(audit.every((row) => row.action === 'redrive' && row.actor === 'ops-test' && row.subscription === 'billing'));
  assert.deepEqual(
    audit.map((row) => row.count),
    [8, 8, 4],
  );
  assert.deepEqual(new Set(audit.flatMap((row) => row.message_ids)), new Set(ids));

  // A dead letter of a message the subscription has handled since: redriven, the inbox keeps it from running twice.
  await sql(
    `insert into "${schema}".dead_letters (subscription, message_id, topic, key, position, envelope, reason, attempts)
      select 'billing', id, topic, key, position, jsonb_build_object('specversion', '1.0', 'id', id, 'source', source, 'type', type,
        'time', time, 'datacontenttype', 'application/json', 'topic', topic, 'partitionkey', key, 'correlationid', correlation_id, 'data', data),
        'copied by the test', '[]'
      from "${schema}".log where id = $1`,
    [ids[0]],
  );
  const again = await json(schema, ['dead-letters', 'redrive', '--error', 'copied by the test']);
  assert.equal(again.count, 1);
  await waitFor('the copy to leave held', async () => (await sql(`select count(*)::int as n from "${schema}".held`))[0].n === 0);
  assert.equal(handled.length, 20, 'the inbox de-duplicated the redriven copy by its id');
});

test('dead letters: drop by id and by error, recorded with the actor; --dry-run changes nothing', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const ids = await makeDeadLetters(
    world,
    'shipping',
    Array.from({ length: 5 }, (_, i) => ({ key: `s${i}`, seq: 1 })),
  );
  const { deadLetters } = await json(schema, ['dead-letters', 'list']);

  const usage = await tidings(['--schema', schema, 'dead-letters', 'drop']);
  assert.equal(usage.code, 2);
  const dry = await json(schema, ['dead-letters', 'drop', '--all', '--dry-run']);
  assert.equal(dry.matched, 5);

  // By dead-letter id, and by message id.
  const dropped = await json(schema, ['dead-letters', 'drop', deadLetters[0].id, deadLetters[1].messageId]);
  assert.equal(dropped.count, 2);
  assert.deepEqual(new Set(dropped.messageIds), new Set([deadLetters[0].messageId, deadLetters[1].messageId]));
  const byError = await tidings(['--schema', schema, 'dead-letters', 'drop', '--error', 'always fails']);
  assert.equal(byError.code, 0, byError.stderr);
  assert.match(byError.stdout, /Dropped 3 dead letters \(shipping: 3\)/);
  assert.equal((await sql(`select count(*)::int as n from "${schema}".dead_letters`))[0].n, 0);

  const audit = await sql(`select action, actor, subscription, message_ids, count, at from "${schema}".dead_letter_actions order by id`);
  assert.deepEqual(
    audit.map((row) => [row.action, row.count]),
    [
      ['drop', 2],
      ['drop', 3],
    ],
  );
  assert.equal(audit[0].actor, `${userInfo().username}@${hostname()}`, 'the actor defaults to user@host');
  assert.deepEqual(new Set(audit.flatMap((row) => row.message_ids)), new Set(ids));
  assert.ok(audit.every((row) => row.at instanceof Date));
});

test('status: lag per partition, oldest unprocessed age, leases and workers', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let started = 0;
  const bus = world.bus('cli-test');
  bus.subscribe(
    'slow',
    Ticked,
    async () => {
      started++;
      await released;
    },
    { partitions: 3 },
  );
  await bus.start();
  await bus.publishMany(
    Ticked,
    Array.from({ length: 6 }, (_, i) => ({ key: 'one-key', seq: i })),
  );
  await waitFor('the first message in its handler', () => started === 1);

  const status = await json(schema, ['status']);
  assert.equal(status.schema, schema);
  const slow = status.subscriptions.find((sub: { name: string }) => sub.name === 'slow');
  assert.deepEqual(slow.topics, ['test.ticked']);
  assert.equal(slow.partitions, 3);
  assert.equal(slow.lag, 6, 'a batch in progress is not acknowledged: all six are lag');
  assert.ok(slow.oldestUnprocessedAgeMs >= 0 && slow.oldestUnprocessedAgeMs < 60_000);
  const busy = slow.cursors.filter((cursor: { lag: number }) => cursor.lag > 0);
  assert.equal(busy.length, 1, 'one key lives in one partition');
  assert.equal(busy[0].lag, 6);
  assert.equal(slow.workers.length, 1);
  assert.ok(slow.workers[0].live);
  for (const cursor of slow.cursors) {
    assert.equal(cursor.owner, slow.workers[0].id, 'the only worker holds every lease');
    assert.ok(cursor.leaseRemainingMs > 0 && cursor.leaseRemainingMs <= 2_000, `lease time left ${cursor.leaseRemainingMs}`);
  }

  const human = await tidings(['--schema', schema, 'status']);
  assert.equal(human.code, 0, human.stderr);
  assert.match(human.stdout, /SUBSCRIPTION +TOPICS +WORKERS +LAG +OLDEST +HANDLED/);
  assert.match(human.stdout, /slow +test\.ticked +1 +6 /);
  // Compact: the one partition behind is shown, not the two caught up; no escape codes into a pipe.
  assert.match(
    human.stdout,
    /\nslow: 3 partitions; 1 of 3 partitions behind\n +PARTITION +OWNER +LEASE +EPOCH +HANDLED +LAG[^\n]*\n +\d +\S+ +\d+\.\d s left +\d+ +0 +6 [^\n]*\n\n/,
  );
  assert.match(human.stdout, /Workers: 1 live in 1 process\./);
  assert.ok(!human.stdout.includes('\x1b['), 'no colour into a pipe');
  const verbose = await tidings(['--schema', schema, 'status', '--verbose']);
  assert.equal(verbose.stdout.match(/ s left /g)?.length, 3, 'every partition with --verbose');
  assert.match(verbose.stdout, /Workers:\n +ID +SUBSCRIPTION +HOST +PID/);
  assert.ok(
    slow.cursors.every((cursor: { epoch: unknown }) => typeof cursor.epoch === 'number'),
    'epoch is a number in JSON',
  );

  // --watch: a reading every 0.2 s until Ctrl-C, one JSON object per line.
  const watching = spawn(process.execPath, [BIN, '--schema', schema, '--json', 'status', '--watch', '0.2'], { env: { ...process.env, DATABASE_URL } });
  let watched = '';
  watching.stdout.on('data', (chunk: Buffer) => (watched += chunk.toString()));
  const watchExit = new Promise<number | null>((resolve) => watching.once('exit', resolve));
  await waitFor('three readings', () => watched.split('\n').length > 3);
  watching.kill('SIGINT');
  assert.equal(await watchExit, 0, 'Ctrl-C ends --watch without an error');
  for (const line of watched.trim().split('\n')) assert.equal(JSON.parse(line).schema, schema);

  release();
  await waitFor('lag back to 0', async () => (await json(schema, ['status', '--subscription', 'slow'])).subscriptions[0].lag === 0);
  const caughtUp = await tidings(['--schema', schema, 'status']);
  assert.match(caughtUp.stdout, /Every subscription is caught up\./);
  assert.doesNotMatch(caughtUp.stdout, /PARTITION/, 'no partition detail when nothing needs a look');
  await bus.stop();
  const stopped = await json(schema, ['status', '--subscription', 'slow']);
  assert.equal(stopped.subscriptions[0].handled, 6);
  assert.ok(
    stopped.subscriptions[0].cursors.every((cursor: { owner: string | null }) => cursor.owner === null),
    'a graceful stop frees the leases',
  );
  const unknown = await tidings(['--schema', schema, 'status', '--subscription', 'nope']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /no subscription nope; it has slow/);
});

test('replay from a position, then from a time: the messages are handled again, in order, by the running bus', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const handled: Array<{ id: string; seq: number }> = [];
  const bus = world.bus('cli-test');
  bus.subscribe('ledger', Ticked, (message) => {
    handled.push({ id: message.id, seq: message.data.seq });
  });
  await bus.start();
  const published = [];
  for (let seq = 1; seq <= 6; seq++) published.push(await bus.publish(Ticked, { key: seq % 2 === 0 ? 'even' : 'odd', seq }));
  await waitFor('six handled', () => handled.length === 6);
  const [third] = await sql(`select position::int8 as position, time from "${schema}".log where id = $1`, [published[2]!.id]);

  const replay = await json(schema, ['replay', 'ledger', '--from', String(third.position)]);
  assert.equal(replay.fromPosition, Number(third.position));
  assert.equal(replay.messages, 4);
  assert.equal(replay.inboxCleared, 4, 'the inbox forgets the replayed messages, or it would skip them');
  assert.equal(replay.skipped, 0);
  await waitFor('the last four handled again', () => handled.length === 10, 15_000);
  assert.deepEqual(
    handled
      .slice(6)
      .map((message) => message.id)
      .sort(),
    published
      .slice(2)
      .map((message) => message.id)
      .sort(),
  );
  for (const key of ['odd', 'even']) {
    const seqs = handled
      .slice(6)
      .filter((message) => (message.seq % 2 === 0 ? 'even' : 'odd') === key)
      .map((message) => message.seq);
    assert.deepEqual(
      seqs,
      [...seqs].sort((a, b) => a - b),
      `${key} replayed in order`,
    );
  }

  const [first] = await sql(`select time from "${schema}".log where id = $1`, [published[0]!.id]);
  const fromTime = await json(schema, ['replay', 'ledger', '--from', new Date(first.time.getTime() - 1_000).toISOString(), '--wait']);
  assert.equal(fromTime.messages, 6);
  assert.equal(fromTime.caughtUp, true, '--wait returns once the workers caught up');
  await waitFor('all six handled a third time', () => handled.length === 16);

  const bad = await tidings(['--schema', schema, 'replay', 'ledger', '--from', 'yesterday']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /log position .* or an ISO 8601 time/);
  const unknown = await tidings(['--schema', schema, 'replay', 'nope', '--from', '1']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /no subscription nope/);
});

test('tail follows new messages of a topic with filters; migrate is idempotent', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const migrated = await json(schema, ['migrate']);
  assert.deepEqual(
    migrated.applied,
    loadMigrations().map((migration) => migration.version),
  );
  assert.deepEqual((await json(schema, ['migrate'])).applied, []);

  const bus = world.bus('cli-test');
  await bus.start();
  const [next] = await sql(`select coalesce(max(position), 0) + 1 as next from "${schema}".log`);
  const tail = tidings(['--schema', schema, '--json', 'tail', 'test.ticked', '--key', 'a', '--grep', 'NEEDLE', '--from', String(next.next), '--limit', '2']);
  await bus.publish(Ticked, { key: 'a', seq: 1 });
  await bus.publish(Ticked, { key: 'b', seq: 2, note: 'needle' });
  const wanted = [await bus.publish(Ticked, { key: 'a', seq: 3, note: 'a needle' }), await bus.publish(Ticked, { key: 'a', seq: 4, note: 'needle again' })];
  const run = await tail;
  assert.equal(run.code, 0, run.stderr);
  const lines = run.stdout
    .trim()
    .split('\n')
    .map((line) => JSON.parse(line));
  assert.deepEqual(
    lines.map((line) => line.id),
    wanted.map((message) => message.id),
  );
  assert.equal(lines[0].data.seq, 3);
  assert.ok(lines[0].position < lines[1].position);

  // Live, from now, stopped by --limit. The tail's first snapshot is taken some time after it starts:
  // publish until it has seen one, and check that what it printed is one of them.
  const live = tidings(['--schema', schema, 'tail', 'test.ticked', '--limit', '1']);
  let exited = false;
  void live.then(() => (exited = true));
  const late = new Map<string, number>();
  for (let seq = 1; !exited && seq < 100; seq++) {
    const message = await bus.publish(Ticked, { key: 'z', seq });
    late.set(message.id, seq);
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
  const liveRun = await live;
  assert.equal(liveRun.code, 0, liveRun.stderr);
  const printed = /^#\d+ +\S+ \S+ +test\.ticked\.v1 +key=z +id=(\S+) +\{"key":"z","seq":(\d+)\}\n$/.exec(liveRun.stdout);
  assert.ok(printed !== null, `one line per message: ${liveRun.stdout}`);
  assert.equal(late.get(printed[1]!), Number(printed[2]));
  assert.match(liveRun.stderr, /^Following test\.ticked in schema \S+ at postgres:\/\/\S+ \(Ctrl-C to stop\)\n$/);
});

test('exit codes: 3 and a password-free URL for an unreachable database, 2 for usage errors, 0 for help', async () => {
  const unreachable = await tidings(['--url', 'postgres://u:secret@127.0.0.1:1/x', 'status']);
  assert.equal(unreachable.code, 3);
  assert.match(unreachable.stderr, /Cannot reach PostgreSQL at postgres:\/\/u@127\.0\.0\.1:1\/x .*Check --url or DATABASE_URL/);
  assert.ok(!unreachable.stderr.includes('secret'), 'the password is never printed');
  const asJson = await tidings(['--url', 'postgres://u:secret@127.0.0.1:1/x', '--json', 'dead-letters', 'list']);
  assert.equal(asJson.code, 3);
  const error = JSON.parse(asJson.stderr).error;
  assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
  assert.equal(error.exitCode, 3);
  assert.ok(!asJson.stderr.includes('secret'));

  const { DATABASE_URL: _, ...withoutUrl } = process.env;
  const noUrl = await tidings(['status'], { env: withoutUrl });
  assert.equal(noUrl.code, 2);
  assert.match(noUrl.stderr, /pass --url .* or set DATABASE_URL/);
  assert.equal((await tidings(['bogus'])).code, 2);
  assert.equal((await tidings(['status', '--nope'])).code, 2);
  assert.equal((await tidings(['--schema', 'Bad-Name', 'status'])).code, 2);
  const help = await tidings(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /Exit codes:\n {2}0 +success\n {2}1 .*\n {2}2 .*usage.*\n {2}3 .*unreachable/);
});

test('migrate --dry-run prints only what the database lacks and changes nothing; --version', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const fresh = await tidings(['--schema', schema, 'migrate', '--dry-run']);
  assert.equal(fresh.code, 0, fresh.stderr);
  assert.match(fresh.stdout, new RegExp(`^-- Tidings: migrations of schema "${schema}"[^\\n]*\\nbegin;\\n`));
  assert.match(fresh.stdout, /-- 001_initial\n/);
  assert.match(fresh.stdout, /\ncommit;\n$/);
  const [created] = await sql(`select count(*)::int as n from information_schema.schemata where schema_name = $1`, [schema]);
  assert.equal(created.n, 0, 'a dry run creates nothing');

  await json(schema, ['migrate']);
  const upToDate = await tidings(['--schema', schema, 'migrate', '--dry-run']);
  assert.equal(upToDate.stdout, `-- Schema ${schema} is up to date: nothing to run.\n`);
  assert.deepEqual((await json(schema, ['migrate', '--dry-run'])).pending, []);

  // With no database, the SQL of a new schema, for a DBA who prepares it elsewhere.
  const { DATABASE_URL: _, ...withoutUrl } = process.env;
  const offline = await tidings(['--schema', schema, 'migrate', '--dry-run'], { env: withoutUrl });
  assert.equal(offline.code, 0);
  assert.equal(offline.stdout, fresh.stdout);
  assert.match(offline.stderr, /No database given: this is the SQL of a new schema/);

  const version = await tidings(['--version']);
  assert.equal(version.code, 0);
  assert.equal(version.stdout.trim(), JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')).version);
});

test("a refused login and a URL that is not PostgreSQL's: exit 3 with what to check, exit 2", async (t) => {
  if (!(await requirePostgres(t))) return;
  const url = new URL(DATABASE_URL);
  url.username = 'no_such_role_tidings';
  url.password = 'secret';
  const refused = await tidings(['--url', url.toString(), 'status']);
  assert.equal(refused.code, 3);
  assert.match(
    refused.stderr,
    /^tidings: PostgreSQL at postgres:\/\/no_such_role_tidings@\S+ refused the login \(.*\)\. Check the user and password in --url or DATABASE_URL\.\n$/,
  );
  assert.ok(!refused.stderr.includes('secret'));
  const mysql = await tidings(['--url', 'mysql://root@localhost/shop', 'status']);
  assert.equal(mysql.code, 2);
  assert.match(mysql.stderr, /The database URL must be a PostgreSQL URL \(postgres:\/\/ or postgresql:\/\/\), not mysql:\/\//);
});

test('a wrong --schema lists the schemas that have Tidings tables; tail warns about a topic nothing knows; show collapses repeated stacks', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus('cli-test');
  bus.subscribe(
    'repeats',
    Ticked,
    () => {
      throw new Error('the same failure every time');
    },
    { retry: { immediate: 2, delayed: [] } },
  );
  await bus.start();
  const [published] = await bus.publishMany(Ticked, [{ key: 'r', seq: 1 }]);
  await waitFor('the dead letter', async () => (await sql(`select count(*)::int as n from "${schema}".dead_letters`))[0].n === 1);

  const wrong = await tidings(['--schema', `${schema}_typo`, 'status']);
  assert.equal(wrong.code, 2);
  assert.match(
    wrong.stderr,
    new RegExp(`Schema ${schema}_typo at postgres://\\S+ has no Tidings tables; (this schema has|these have): [^\\n]*\\b${schema}\\b`),
  );

  const shown = await tidings(['--schema', schema, 'dead-letters', 'show', published!.id]);
  assert.match(shown.stdout, /Attempts \(3\):\n {2}#1 at [^\n]*the same failure every time\n {6}at [^\n]*\n(?: {6}at [^\n]*\n)*/);
  assert.equal(shown.stdout.match(/\(thrown from the same place as #1: stack above\)/g)?.length, 2, `the stack once, then referred to:\n${shown.stdout}`);

  const tail = spawn(process.execPath, [BIN, '--schema', schema, 'tail', 'test.tickd'], { env: { ...process.env, DATABASE_URL } });
  let stderr = '';
  tail.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => tail.once('exit', resolve));
  await waitFor('the tail to start', () => stderr.includes('Following'));
  tail.kill('SIGINT');
  assert.equal(await exited, 0);
  assert.match(
    stderr,
    /^Warning: no subscription handles test\.tickd, and none of the newest 10,000 messages has it: check the name \(the subscriptions handle test\.ticked\)\. Waiting for it all the same\.\n/,
  );
  const known = await tidings(['--schema', schema, '--json', 'tail', 'test.ticked', '--from', '1', '--limit', '1']);
  assert.doesNotMatch(known.stderr, /Warning/);
});

test('status shows a rolling deploy: the worker without a handler for a topic of its subscription, and the topics of each worker', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const { Tocked } = await import('./fixtures/contracts.ts');
  const old = world.bus('cli-test');
  old.subscription('deploying', { partitions: 2 }).on(Ticked, () => undefined);
  await old.start();
  const neu = world.bus('cli-test');
  neu
    .subscription('deploying', { partitions: 2 })
    .on(Ticked, () => undefined)
    .on(Tocked, () => undefined);
  await neu.start();
  const status = await json(schema, ['status']);
  const sub = status.subscriptions.find((entry: { name: string }) => entry.name === 'deploying');
  assert.deepEqual(sub.topics, ['test.ticked', 'test.tocked']);
  assert.equal(sub.disagreements.length, 1);
  assert.deepEqual(sub.disagreements[0].missing, ['test.tocked']);
  assert.deepEqual(
    sub.workers.map((worker: { topics: string[] }) => worker.topics),
    [['test.ticked'], ['test.ticked', 'test.tocked']],
  );
  const text = await tidings(['--schema', schema, 'status']);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /! deploying: worker \S+ has no handler for test\.tocked; it holds no partition/);
  // Once the old worker stops, they agree again.
  await old.stop();
  const after = await json(schema, ['status', '--subscription', 'deploying']);
  assert.deepEqual(after.subscriptions[0].disagreements, []);
});

test('subscriptions drop: refused while a worker lives; then a command moves to a new owner', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const { Charge } = await import('./fixtures/contracts.ts');
  const old = world.bus('cli-test');
  old.subscribe('payments-v1', Charge, () => undefined);
  await old.start();
  const refused = await tidings(['--schema', schema, 'subscriptions', 'drop', 'payments-v1']);
  assert.notEqual(refused.code, 0);
  assert.match(refused.stderr, /has 1 live worker .*: stop it first/);
  await old.stop();
  const neu = world.bus('cli-test');
  neu.subscribe('payments-v2', Charge, () => undefined);
  await assert.rejects(neu.start(), /Command test\.charge is handled by subscription payments-v1 already.*tidings subscriptions drop payments-v1/);
  const dropped = await json(schema, ['subscriptions', 'drop', 'payments-v1']);
  assert.equal(dropped.subscription, 'payments-v1');
  const again = world.bus('cli-test');
  again.subscribe('payments-v2', Charge, () => undefined);
  await again.start();
  assert.deepEqual(
    (await json(schema, ['status'])).subscriptions.map((sub: { name: string }) => sub.name),
    ['payments-v2'],
  );
});

test('sagas list and show: instances by state, one whole with its transitions; an unknown instance exits 1 with the list command', async (t) => {
  const world = await pgWorld(t, 'cli');
  if (world === undefined) return;
  const { schema } = world;
  const { Counter, CounterAdded, CounterStarted } = await import('./fixtures/counter-saga.ts');
  const bus = world.bus('cli-test');
  bus.saga(Counter);
  await bus.start();
  await bus.publish(CounterStarted, { id: 'c1' });
  await bus.publish(CounterAdded, { id: 'c1', n: 4, slot: 1 });
  const added = await bus.publish(CounterAdded, { id: 'c1', n: 6, slot: 2 });
  await bus.publish(CounterStarted, { id: 'c2' });
  await waitFor('three transitions of c1 and a start of c2', async () => {
    const rows = await sql(`select id, version from "${schema}".sagas order by id`);
    return rows.length === 2 && rows[0].version === 3;
  });
  const list = await json(schema, ['sagas', 'list', '--saga', 'test.counter']);
  assert.equal(list.total, 2);
  assert.deepEqual(list.sagas.map((row: { id: string }) => row.id).sort(), ['c1', 'c2']);
  const shown = await json(schema, ['sagas', 'show', 'test.counter', 'c1']);
  assert.deepEqual(shown.state, { id: 'c1', sum: 10, adds: 2 });
  assert.equal(shown.transitions.length, 3);
  assert.equal(shown.transitions[2].messageId, added.id);
  const text = await tidings(['--schema', schema, 'sagas', 'show', 'test.counter', 'c1']);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /Saga test\.counter instance c1: version 3, active/);
  assert.match(text.stdout, /"sum": 10/);
  assert.match(text.stdout, new RegExp(`v3 at .*: test\\.counter-added \\(message ${added.id}\\)`));
  const table = await tidings(['--schema', schema, 'sagas', 'list']);
  assert.match(table.stdout, /test\.counter +c1 +3 +active/);
  const missing = await tidings(['--schema', schema, 'sagas', 'show', 'test.counter', 'nobody']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /No instance nobody of saga test\.counter .*tidings sagas list --saga test\.counter/);
});
