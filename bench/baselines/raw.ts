/** The raw floor: what PostgreSQL itself does here with the `pg` package, on rows like the events. */
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import { from as copyFrom } from 'pg-copy-streams';
import { runChild } from '../load/child.ts';
import { makeEvent } from '../load/events.ts';
import { now, percentile, produce, rate, sleep } from '../load/measure.ts';
import { rawSingleRowCommits } from '../harness/plan.ts';
import { BUSINESS_INSERT, BUSINESS_NOTE } from '../load/pg.ts';
import type { ChildResult, Task } from '../protocol.ts';

const TABLE = 'bench_raw_events';

async function connect(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

function row(seq: number): [string, string] {
  return ['bench.event', JSON.stringify(makeEvent(seq, 1_000))];
}

async function resetTable(client: pg.Client): Promise<void> {
  await client.query(`drop table if exists ${TABLE}`);
  await client.query(
    `create table ${TABLE} (id bigserial primary key, topic text not null, payload jsonb not null, created_at timestamptz not null default now())`,
  );
}

/** Multi-row INSERT, 1,000 rows per statement (one transaction each). */
async function multiRowInsert(client: pg.Client, total: number): Promise<number> {
  await resetTable(client);
  const per = 1_000;
  const statements: Array<{ text: string; values: string[] }> = [];
  for (let first = 0; first < total; first += per) {
    const n = Math.min(per, total - first);
    const values: string[] = [];
    const tuples: string[] = [];
    for (let i = 0; i < n; i++) {
      values.push(...row(first + i));
      tuples.push(`($${2 * i + 1}, $${2 * i + 2}::jsonb)`);
    }
    statements.push({ text: `insert into ${TABLE} (topic, payload) values ${tuples.join(',')}`, values });
  }
  const t0 = now();
  for (const statement of statements) await client.query(statement.text, statement.values);
  return rate(total, now() - t0);
}

/** The same rows sent as one JSON array parameter per 1,000 (how Tidings writes a batch). */
async function jsonArrayInsert(client: pg.Client, total: number): Promise<number> {
  await resetTable(client);
  const per = 1_000;
  const arrays: string[] = [];
  for (let first = 0; first < total; first += per) {
    const n = Math.min(per, total - first);
    arrays.push(`[${Array.from({ length: n }, (_, i) => row(first + i)[1]).join(',')}]`);
  }
  const t0 = now();
  for (const array of arrays) {
    await client.query(`insert into ${TABLE} (topic, payload) select 'bench.event', value from jsonb_array_elements($1::jsonb)`, [array]);
  }
  return rate(total, now() - t0);
}

/** The same rows with `COPY ... FROM STDIN` (text format), 1,000 per COPY, each its own transaction. */
async function copyIn(client: pg.Client, total: number): Promise<number> {
  await resetTable(client);
  const per = 1_000;
  const texts: string[] = [];
  for (let first = 0; first < total; first += per) {
    const n = Math.min(per, total - first);
    // JSON text has no tabs or newlines; its backslashes are COPY's escape character.
    texts.push(
      `${Array.from({ length: n }, (_, i) =>
        row(first + i)
          .map((field) => field.replaceAll('\\', '\\\\'))
          .join('\t'),
      ).join('\n')}\n`,
    );
  }
  const t0 = now();
  for (const text of texts) await pipeline(Readable.from([text]), client.query(copyFrom(`copy ${TABLE} (topic, payload) from stdin`)));
  return rate(total, now() - t0);
}

/** Single-row autocommit inserts from `clients` connections; optionally each also sends a NOTIFY. */
async function singleRows(clients: pg.Client[], total: number, notify: boolean): Promise<number> {
  await resetTable(clients[0]!);
  const text = notify
    ? `with i as (insert into ${TABLE} (topic, payload) values ($1, $2::jsonb) returning id) select pg_notify('bench_raw', id::text) from i`
    : `insert into ${TABLE} (topic, payload) values ($1, $2::jsonb)`;
  const pool = [...clients];
  const t0 = now();
  await produce(total, clients.length, async (seq, producer) => {
    const client = pool[producer]!;
    await client.query(text, row(seq));
  });
  return rate(total, now() - t0);
}

/** BEGIN; INSERT; COMMIT from `clients` connections: the round trips of one event per application transaction. */
async function explicitTransactions(clients: pg.Client[], total: number): Promise<number> {
  await resetTable(clients[0]!);
  const t0 = now();
  await produce(total, clients.length, async (seq, producer) => {
    const client = clients[producer]!;
    await client.query('begin');
    await client.query(`insert into ${TABLE} (topic, payload) values ($1, $2::jsonb)`, row(seq));
    await client.query('commit');
  });
  return rate(total, now() - t0);
}

/**
 * BEGIN; INSERT the business row; COMMIT from `clients` connections: what workload 3's "business row + event"
 * rows do without the event, the floor they are compared with (issue 24).
 */
async function businessTransactions(clients: pg.Client[], total: number): Promise<number> {
  const first = clients[0]!;
  await first.query('drop table if exists bench_business');
  await first.query('create table bench_business (id bigserial primary key, seq bigint not null, note text not null, at timestamptz not null default now())');
  const t0 = now();
  await produce(total, clients.length, async (seq, producer) => {
    const client = clients[producer]!;
    await client.query('begin');
    await client.query(BUSINESS_INSERT, [seq, BUSINESS_NOTE]);
    await client.query('commit');
  });
  return rate(total, now() - t0);
}

/** NOTIFY on one connection -> notification on another, sequential samples. */
async function notifyRoundTrip(sender: pg.Client, listener: pg.Client, samples: number): Promise<{ p50: number; p99: number }> {
  await listener.query('listen bench_rtt');
  let waiting: ((payload: string) => void) | undefined;
  listener.on('notification', (message) => waiting?.(message.payload ?? ''));
  const times: number[] = [];
  for (let i = 0; i < samples; i++) {
    const arrived = new Promise<string>((resolve) => {
      waiting = resolve;
    });
    const t0 = now();
    await sender.query('select pg_notify($1, $2)', ['bench_rtt', String(i)]);
    await arrived;
    times.push(now() - t0);
  }
  await listener.query('unlisten bench_rtt');
  times.sort((a, b) => a - b);
  return { p50: percentile(times, 50), p99: percentile(times, 99) };
}

async function raw(task: Task): Promise<ChildResult> {
  const clients = await Promise.all(Array.from({ length: 10 }, () => connect(task.pgUrl)));
  const first = clients[0]!;
  const listener = await connect(task.pgUrl);
  const metrics: Record<string, number> = {};
  metrics.insertMulti = await multiRowInsert(first, task.events);
  await sleep(200);
  metrics.insertJson = await jsonArrayInsert(first, task.events);
  await sleep(200);
  metrics.copy = await copyIn(first, task.events);
  await sleep(200);
  metrics.single1 = await singleRows([first], Math.round(task.events / 10), false);
  await sleep(200);
  metrics.single10 = await singleRows(clients, rawSingleRowCommits(task.events), false);
  await sleep(200);
  metrics.tx10 = await explicitTransactions(clients, Math.round(task.events / 4));
  await sleep(200);
  metrics.business10 = await businessTransactions(clients, Math.round(task.events / 4));
  await sleep(200);
  metrics.single10notify = await singleRows(clients, Math.round(task.events / 6), true);
  await sleep(200);
  const rtt = await notifyRoundTrip(first, listener, task.quick ? 500 : 2_000);
  metrics.notifyP50 = rtt.p50;
  metrics.notifyP99 = rtt.p99;
  await first.query(`drop table if exists ${TABLE}`);
  await Promise.all([...clients, listener].map((client) => client.end()));
  return { ok: true, metrics };
}

runChild({ raw });
