/**
 * The RabbitMQ backbone under faults: connections closed by the server mid-stream, and the broker stopped
 * and started again. Nothing is lost; duplicates happen only where at-least-once allows, and the inbox
 * removes them.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { TidingsError } from '../src/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, createEffects, RABBITMQ_URL, requireBroker, requirePostgres, sleep, waitFor } from './helpers.ts';
import { closeConnections, Harness, rabbitmqctl, warnings } from './rabbitmq.helpers.ts';

const harnesses: Harness[] = [];
after(async () => {
  for (const harness of harnesses) await harness.cleanup();
});

test('connections closed by the server while publishing and consuming: every message handled once, in per-key order', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL)) || !(await requirePostgres(t))) return;
  const h = new Harness();
  harnesses.push(h);
  await createEffects(h.schema);
  const bus = h.bus('faults', { outbox: true });
  let handlerRuns = 0;
  bus.subscribe(
    'effects',
    Ticked,
    async (message, ctx) => {
      handlerRuns++;
      await ctx.tx.query(`insert into "${h.schema}".effects (message_id, key, seq, worker) values ($1, $2, $3, 1)`, [message.id, message.data.key, message.data.seq]);
      if (message.data.seq % 10 === 0) await sleep(2);
    },
    { concurrency: 8 },
  );
  await bus.start();
  const keys = 40;
  const perKey = 50;
  let kills = 0;
  let killing = true;
  const killer = (async () => {
    while (killing) {
      await sleep(400);
      if (killing) kills += (await closeConnections(h.connectionName)) > 0 ? 1 : 0;
    }
  })();
  let retriedByCaller = 0;
  const started = Date.now();
  await Promise.all(
    Array.from({ length: keys }, async (_, k) => {
      for (let seq = 1; seq <= perKey; seq++) {
        // The documented contract: a publish that failed retryably is published again with the same id.
        const id = `${h.prefix}${k}-${seq}`;
        for (;;) {
          try {
            await bus.publish(Ticked, { key: `key-${k}`, seq }, { id });
            break;
          } catch (error) {
            if (!(error instanceof TidingsError && error.retryable)) throw error;
            retriedByCaller++;
          }
        }
        if (seq % 10 === 0) await sleep(20);
      }
    }),
  );
  const client = await connect();
  t.after(() => client.end());
  const count = async () => Number((await client.query(`select count(*) as n from "${h.schema}".effects`)).rows[0].n);
  await waitFor('every effect', async () => (await count()) >= keys * perKey, 45_000);
  // However fast the stream went, the connections were closed under it at least twice.
  await waitFor('two closings', () => kills >= 2, 10_000);
  killing = false;
  await killer;
  await sleep(300);
  const { rows } = await client.query<{ key: string; seqs: number[]; ids: number }>(
    `select key, array_agg(seq order by n) as seqs, count(distinct message_id)::int as ids from "${h.schema}".effects group by key`,
  );
  assert.equal(rows.length, keys);
  for (const row of rows) {
    assert.equal(row.ids, perKey, `every message of ${row.key} once`);
    assert.deepEqual(row.seqs, Array.from({ length: perKey }, (_, i) => i + 1), `${row.key}: each effect once, in order`);
  }
  assert.equal(await count(), keys * perKey, 'no effect twice (the inbox removed redeliveries)');
  assert.ok(kills >= 2, `connections were closed (${kills} times)`);
  const reconnects = warnings.filter((w) => w.includes('closed; reconnecting')).length;
  assert.ok(reconnects >= 2, `the backbone reconnected (${reconnects} times)`);
  t.diagnostic(warnings.filter((w) => !w.includes('closed; reconnecting')).slice(0, 5).join(' | '));
  t.diagnostic(`${keys * perKey} messages in ${Date.now() - started} ms; connections closed ${kills} times, ${reconnects} reconnections; ${handlerRuns} handler runs (redeliveries of handled messages stop at the inbox); ${retriedByCaller} publishes retried by the caller`);
});

test('the broker stopped and started: a publish fails with a retryable BACKBONE_UNAVAILABLE in bounded time, then everything resumes', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return;
  const h = new Harness();
  harnesses.push(h);
  const bus = h.bus('outage', { rabbit: { publishTimeoutMs: 1_500 } });
  const seen = new Map<string, number>();
  bus.subscribe('outage', Ticked, (message) => {
    seen.set(message.id, (seen.get(message.id) ?? 0) + 1);
  });
  await bus.start();
  const before = await bus.publish(Ticked, { key: 'k', seq: 1 });
  await waitFor('the first message', () => seen.has(before.id));
  await rabbitmqctl('stop_app');
  try {
    const started = Date.now();
    const error = await bus.publish(Ticked, { key: 'k', seq: 2 }, { id: `${h.prefix}during` }).then(
      () => undefined,
      (caught: unknown) => caught,
    );
    assert.ok(error instanceof TidingsError, `a TidingsError, got ${String(error)}`);
    assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
    assert.equal(error.retryable, true);
    assert.equal(error.ref?.id, `${h.prefix}during`);
    assert.ok(Date.now() - started < 5_000, 'it did not hang');
  } finally {
    await rabbitmqctl('start_app');
  }
  // The caller retries with the same id; the consumer has reconnected and receives it.
  await waitFor(
    'the retried publish',
    async () => {
      try {
        await bus.publish(Ticked, { key: 'k', seq: 2 }, { id: `${h.prefix}during` });
        return true;
      } catch {
        return false;
      }
    },
    30_000,
  );
  await waitFor('the message published after the outage', () => seen.has(`${h.prefix}during`), 30_000);
  assert.equal(seen.get(before.id), 1);
});
