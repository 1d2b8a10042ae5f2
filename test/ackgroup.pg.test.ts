/**
 * Acknowledgements that commit alone, of every subscription of a backbone, commit together (AckGroup,
 * src/postgres/consume/ack-group.ts): one that fails its fence inside a combined transaction must fail
 * alone, and the others must commit (each message once per subscription, in key order, nothing lost); a
 * process killed with -9 leaves each combined transaction committed whole or not at all.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import pg from 'pg';
import { AckGroup, type AckStatement } from '../src/postgres/consume/ack-group.ts';
import { pgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { startProcess } from './fixtures/processes.ts';
import { connect, DATABASE_URL, sleep, waitFor } from './helpers.ts';

/** Tidings' own pool pipelines a transaction's statements; a pool you give it (without `pipeline: true`) sends them one by one. */
type Pooling = 'own pool (pipelined)' | 'caller pool (not pipelined)';
const POOLINGS: Pooling[] = ['own pool (pipelined)', 'caller pool (not pipelined)'];

/** A group on a backbone of the test's own, and statements recording inbox ids `n` (an acknowledgement's one 'fail' can turn into 'skip'). */
async function groupOn(t: Parameters<typeof pgWorld>[0], prefix: string, pooling: Pooling) {
  const world = await pgWorld(t, prefix);
  if (world === undefined) return undefined;
  let pool: pg.Pool | undefined;
  if (pooling === 'caller pool (not pipelined)') {
    pool = new pg.Pool({ connectionString: DATABASE_URL, max: 6 });
    t.after(() => pool!.end().catch(() => undefined));
  }
  const backbone = world.backbone(pool === undefined ? {} : { pool });
  await backbone.open();
  t.after(() => backbone.close());
  const { driver } = backbone;
  const insert =
    (n: number): AckStatement =>
    (duplicates) => ({
      text: `insert into "${world.schema}".inbox (subscription, message_id) values ('ag', $1)${duplicates === 'skip' ? ' on conflict do nothing' : ''}`,
      params: [String(n)],
    });
  const rows = async () =>
    (await driver.query<{ n: number; tx: string }>(`select message_id::int as n, xmin::text as tx from "${world.schema}".inbox order by 1`)).rows.map(
      ({ n, tx }) => ({
        n,
        tx,
      }),
    );
  return { group: new AckGroup(driver), driver, schema: world.schema, insert, rows };
}

for (const pooling of POOLINGS) {
  test(`acknowledgements sent while one commits commit together, in one transaction (${pooling})`, { timeout: 30_000 }, async (t) => {
    const setUp = await groupOn(t, 'ag1', pooling);
    if (setUp === undefined) return;
    const { group, insert, rows } = setUp;
    // The first goes at once; the four sent while it commits wait for it, then commit in one transaction.
    await Promise.all([1, 2, 3, 4, 5].map((n) => group.commit(insert(n))));
    const committed = await rows();
    assert.deepEqual(
      committed.map(({ n }) => n),
      [1, 2, 3, 4, 5],
    );
    const transactions = new Set(committed.slice(1).map(({ tx }) => tx));
    assert.equal(transactions.size, 1, 'the four that waited committed in one transaction');
    assert.notEqual(committed[0]!.tx, committed[1]!.tx, 'the first went alone');
  });

  test(`one that fails inside a combined transaction fails alone: the others commit, an inbox id found recorded is skipped (${pooling})`, {
    timeout: 30_000,
  }, async (t) => {
    const setUp = await groupOn(t, 'ag2', pooling);
    if (setUp === undefined) return;
    const { group, driver, schema, insert, rows } = setUp;
    await driver.query(`insert into "${schema}".inbox (subscription, message_id) values ('ag', '4')`); // as another worker would
    const failing: AckStatement = () => ({ text: 'select 1 / 0', params: [] }); // as a fence that fails (a lease lost)
    const outcomes = await Promise.allSettled([insert(1), insert(2), failing, insert(3), insert(4)].map((ack) => group.commit(ack)));
    assert.deepEqual(
      outcomes.map((outcome) => outcome.status),
      ['fulfilled', 'fulfilled', 'rejected', 'fulfilled', 'fulfilled'],
    );
    assert.equal(((outcomes[2] as PromiseRejectedResult).reason as { code?: string }).code, '22012', 'the failing one rejects with its own error');
    assert.deepEqual(
      (await rows()).map(({ n }) => n),
      [1, 2, 3, 4],
      'the others committed, once each',
    );
  });
}

test('subscriptions acknowledging together: one loses its lease mid-run, the others handle each message once, in key order', {
  timeout: 60_000,
}, async (t) => {
  const world = await pgWorld(t, 'ag3');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus('fan');
  const db = await connect();
  t.after(() => db.end());
  const SUBSCRIPTIONS = ['victim', 's1', 's2', 's3', 's4', 's5'];
  const KEYS = 7;
  const BURSTS = 40;
  const PER_BURST = 15;
  const total = BURSTS * PER_BURST;
  const STEAL_AT = [150, 400];
  const handled = new Map<string, Array<{ id: string; key: string; seq: number }>>(SUBSCRIPTIONS.map((name) => [name, []]));
  const stolen = new Set<number>();
  for (const name of SUBSCRIPTIONS) {
    bus.subscribe(
      name,
      Ticked,
      async (message) => {
        handled.get(name)!.push({ id: message.id, key: message.data.key, seq: message.data.seq });
        if (name !== 'victim' || !STEAL_AT.includes(message.data.seq) || stolen.has(message.data.seq)) return;
        stolen.add(message.data.seq);
        // Another worker takes every partition over (and lets the lease lapse at once, so ours takes it back):
        // this batch's acknowledgement fails its fence, whichever acknowledgements it commits with.
        await db.query(
          `update "${schema}".cursors set owner = 'someone-else', epoch = epoch + 1, lease_expires_at = now() - interval '1 second' where subscription = 'victim'`,
        );
      },
      { partitions: 2, concurrency: 4, inbox: true, startFrom: 'beginning' },
    );
  }
  await bus.start();
  for (let burst = 0; burst < BURSTS; burst++) {
    const seqs = Array.from({ length: PER_BURST }, (_, i) => burst * PER_BURST + i);
    await bus.publishMany(
      Ticked,
      seqs.map((seq) => ({ key: `k${seq % KEYS}`, seq })),
    );
  }
  const inboxOf = async (name: string) =>
    (await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".inbox where subscription = $1`, [name])).rows[0]!.n;
  for (const name of SUBSCRIPTIONS) await waitFor(`${name}'s inbox records`, async () => (await inboxOf(name)) === total, 45_000);
  assert.deepEqual([...stolen].sort(), STEAL_AT, "the victim's lease was taken twice");
  for (const [name, seen] of handled) {
    const ids = new Set(seen.map(({ id }) => id));
    assert.equal(ids.size, total, `${name} handled every message`);
    if (name !== 'victim') assert.equal(seen.length, total, `${name} handled each message once`);
    // Per key, the first handling of each message in publishing order (a batch read again repeats, in order).
    const firsts = new Map<string, number[]>();
    const once = new Set<string>();
    for (const { id, key, seq } of seen) {
      if (once.has(id)) continue;
      once.add(id);
      firsts.set(key, [...(firsts.get(key) ?? []), seq]);
    }
    for (const [key, seqs] of firsts) {
      assert.deepEqual(
        seqs,
        [...seqs].sort((a, b) => a - b),
        `${name}: ${key} in order`,
      );
    }
  }
  const victim = handled.get('victim')!;
  assert.ok(victim.length > total, 'the batches whose acknowledgement failed its fence were read again');
  // Acknowledgements of several subscriptions did commit in one transaction (their inbox rows share it).
  const { rows } = await db.query<{ n: number }>(
    `select count(*)::int as n from (select xmin::text from "${schema}".inbox group by 1 having count(distinct subscription) > 1) together`,
  );
  assert.ok(rows[0]!.n > 0, 'some acknowledgements of several subscriptions committed together');
});

test('kill -9 of a process whose subscriptions acknowledge together: nothing lost; a message acknowledged before the kill is not handled again', {
  timeout: 60_000,
}, async (t) => {
  const world = await pgWorld(t, 'ag4');
  if (world === undefined) return;
  const { schema } = world;
  const db = await connect();
  t.after(() => db.end());
  const publisher = world.bus('publisher');
  await publisher.start();
  const SUBSCRIPTIONS = 5;
  const names = Array.from({ length: SUBSCRIPTIONS }, (_, i) => `fan${i}`);
  const env = { SCHEMA: schema, SUBSCRIPTIONS: String(SUBSCRIPTIONS), HANDLE_MS: '1' };
  const published: string[] = [];
  let publishing = true;
  const publishingLoop = (async () => {
    for (let seq = 0; publishing; seq++) {
      const batch = Array.from({ length: 10 }, (_, i) => ({ key: `k${(seq * 10 + i) % 5}`, seq: seq * 10 + i }));
      published.push(...(await publisher.publishMany(Ticked, batch)).map(({ id }) => id));
      await sleep(20);
    }
  })();
  const inboxes = async () => {
    const { rows } = await db.query<{ subscription: string; message_id: string }>(`select subscription, message_id from "${schema}".inbox`);
    const by = new Map<string, Set<string>>(names.map((name) => [name, new Set()]));
    for (const { subscription, message_id } of rows) by.get(subscription)?.add(message_id);
    return by;
  };
  const first = await startProcess('fan-worker', env);
  // Mid-run: every subscription has acknowledged some messages, and the process is handling more.
  await waitFor('every subscription acknowledged some', async () => [...(await inboxes()).values()].every((ids) => ids.size >= 30), 30_000);
  await first.nextLine(/^handled /);
  first.kill();
  assert.equal(await first.exited, 'SIGKILL');
  const acknowledged = await inboxes(); // final: the dead process commits nothing more
  const second = await startProcess('fan-worker', env);
  await sleep(500);
  publishing = false;
  await publishingLoop;
  await waitFor(
    'every message acknowledged by every subscription',
    async () => [...(await inboxes()).values()].every((ids) => published.every((id) => ids.has(id))),
    40_000,
  );
  await second.stop();
  const again = second.lines.filter((line) => line.startsWith('handled ')).map((line) => line.split(' ') as [string, string, string]);
  const repeated = again.filter(([, name, id]) => acknowledged.get(name)!.has(id));
  assert.deepEqual(repeated, [], 'no message acknowledged before the kill was handled again');
  for (const name of names) {
    const { rows } = await db.query<{ n: number }>(`select count(*)::int as n from "${schema}".inbox where subscription = $1`, [name]);
    assert.equal(rows[0]!.n, published.length, `${name}: every message recorded once`);
  }
  const { rows } = await db.query<{ n: number }>(
    `select count(*)::int as n from (select xmin::text from "${schema}".inbox group by 1 having count(distinct subscription) > 1) together`,
  );
  assert.ok(rows[0]!.n > 0, 'some acknowledgements of several subscriptions committed together');
});
