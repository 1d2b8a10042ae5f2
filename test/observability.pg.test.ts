/**
 * On PostgreSQL: the Prometheus endpoint (tidings/metrics) scraped over HTTP and parsed by a Prometheus text
 * parser, with the counters of what was handled and the gauges the backbone's status feeds (lag per partition,
 * held keys, dead letters); and `bus.health()` with its HTTP probes, ready while the database answers and not
 * once it does not.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import pg from 'pg';
import { createBus, deadLetter, healthFetch, healthHandler, retryLater } from '../src/index.ts';
import { prometheusMetrics } from '../src/metrics/index.ts';
import { pgWorld } from './fixtures/bus.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, DATABASE_URL, waitFor } from './helpers.ts';

async function serve(t: { after(fn: () => Promise<void>): void }, handler: Parameters<typeof createServer>[1]): Promise<string> {
  const server: Server = createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/** The value of `name`'s sample whose labels include `where` (undefined when there is none). */
function sample(text: string, name: string, where: Record<string, string> = {}): number | undefined {
  const family = parsePrometheusTextFormat(text).find((candidate) => candidate.name === name);
  const found = family?.metrics.find((metric) => Object.entries(where).every(([label, value]) => metric.labels?.[label] === value));
  return found?.value === undefined ? (found?.count === undefined ? undefined : Number(found.count)) : Number(found.value);
}

test('tidings/metrics: a Prometheus scrape over HTTP has the counters, histograms and the status gauges', async (t) => {
  const world = await pgWorld(t, 'met');
  if (world === undefined) return;
  const metrics = await prometheusMetrics();
  t.after(() => metrics.shutdown());
  const bus = createBus({ service: 'metered', backbone: world.backbone(), telemetry: { meterProvider: metrics.meterProvider, tracing: false } });
  t.after(() => bus.stop());
  bus.subscribe(
    'metered',
    Ticked,
    (message) => {
      if (message.data.key === 'held') return retryLater(60_000, 'not yet');
      if (message.data.key === 'dead') return deadLetter('refused');
    },
    { partitions: 2 },
  );
  await bus.start();
  await bus.publishMany(Ticked, [
    { key: 'ok', seq: 1 },
    { key: 'ok', seq: 2 },
    { key: 'held', seq: 1 },
    { key: 'held', seq: 2 },
    { key: 'dead', seq: 1 },
  ]);
  const url = await serve(t, (request, response) => (request.url === '/metrics' ? metrics.handler(request, response) : response.end()));
  let text = '';
  const where = { messaging_consumer_group_name: 'metered', messaging_destination_name: 'test.ticked' };
  await waitFor(
    'two handled, one dead letter, one held key in the scrape',
    async () => {
      const response = await fetch(`${url}/metrics`);
      assert.match(response.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
      text = await response.text();
      return (
        sample(text, 'tidings_messages_handled_total', where) === 2 &&
        sample(text, 'tidings_messages_dead_lettered_total', where) === 1 &&
        // One status read (cached for seconds) may come between the held key's commit and the dead letter's.
        sample(text, 'tidings_subscription_held_keys', { messaging_consumer_group_name: 'metered' }) === 1 &&
        sample(text, 'tidings_subscription_dead_letters', { messaging_consumer_group_name: 'metered' }) === 1
      );
    },
    30_000,
  );
  assert.equal(sample(text, 'messaging_client_sent_messages_total', { messaging_destination_name: 'test.ticked', messaging_system: 'postgres' }), 5);
  assert.equal(sample(text, 'tidings_messages_retried_total', where), 1);
  const process = parsePrometheusTextFormat(text).find((family) => family.name === 'messaging_process_duration');
  assert.equal(process?.type, 'HISTOGRAM');
  const lags = parsePrometheusTextFormat(text).find((family) => family.name === 'tidings_subscription_lag');
  assert.equal(lags?.type, 'GAUGE');
  assert.deepEqual(lags?.metrics.map((metric) => metric.labels?.messaging_destination_partition_id).sort(), ['0', '1'], 'lag per partition');
  const viaFetch = await (await metrics.fetch()).text();
  assert.ok(sample(viaFetch, 'tidings_messages_handled_total', where)! >= 2, 'the Fetch handler serves the same text');
  // Before the schema is dropped (pgWorld's cleanup, which runs first).
  await bus.stop();
});

test('bus.health(): ready once started, with its checks; the probes answer 200, then 503 with the reason when the database is gone', async (t) => {
  const world = await pgWorld(t, 'hl');
  if (world === undefined) return;
  const pool = new pg.Pool({ connectionString: DATABASE_URL, max: 6 });
  const bus = createBus({ service: 'probed', backbone: world.backbone({ pool, url: undefined }) });
  t.after(() => bus.stop().catch(() => undefined));
  bus.subscribe('probed', Ticked, () => undefined);
  const before = await bus.health();
  assert.equal(before.live, true);
  assert.equal(before.ready, false);
  assert.deepEqual(before.reasons, ['bus: the bus is idle: call bus.start()']);
  await bus.start();
  const health = await bus.health();
  assert.equal(health.ready, true, JSON.stringify(health));
  assert.deepEqual(
    health.checks.map((check) => check.name),
    ['bus', 'database', 'notifier'],
  );
  assert.equal(health.checks.find((check) => check.name === 'notifier')?.detail, 'listening');
  const url = await serve(t, healthHandler(bus));
  assert.equal((await fetch(`${url}/livez`)).status, 200);
  const ready = await fetch(`${url}/readyz`);
  assert.equal(ready.status, 200);
  assert.equal(((await ready.json()) as { ready: boolean }).ready, true);
  assert.equal((await fetch(`${url}/elsewhere`)).status, 404);
  const probe = healthFetch(bus);
  assert.equal((await probe(new Request('http://pod/readyz'))).status, 200);

  await pool.end();
  const unready = await fetch(`${url}/readyz`);
  assert.equal(unready.status, 503);
  const body = (await unready.json()) as { live: boolean; reasons: string[] };
  assert.equal(body.live, true, 'the database being gone is not a reason to restart the process');
  assert.match(body.reasons.join('\n'), /^database: .* is unreachable/m);
  assert.equal((await fetch(`${url}/livez`)).status, 200);
  await bus.stop().catch(() => undefined);
  assert.equal((await fetch(`${url}/livez`)).status, 503, 'a stopped bus is not live');
});

test("events from the backbone: a lost lease, and the notifier's connection lost and restored, reach listeners and the logger", async (t) => {
  const world = await pgWorld(t, 'ev');
  if (world === undefined) return;
  const lines: { level: number; msg: string; backbone?: string; subscription?: string }[] = [];
  const logger = {
    error: (record: object, msg: string) => lines.push({ level: 50, msg, ...record }),
    warn: (record: object, msg: string) => lines.push({ level: 40, msg, ...record }),
    info: (record: object, msg: string) => lines.push({ level: 30, msg, ...record }),
  };
  const bus = createBus({ service: 'evented', backbone: world.backbone(), logger, telemetry: false });
  const events: string[] = [];
  bus.on('lease:lost', (event) => {
    events.push(`lease:lost ${event.subscription}`);
  });
  bus.on('connection:lost', (event) => {
    events.push(`connection:lost ${event.backbone}`);
  });
  bus.on('connection:restored', (event) => {
    events.push(`connection:restored ${event.backbone}`);
  });
  bus.subscribe('leased', Ticked, () => undefined, { partitions: 1 });
  await bus.start();
  const admin = await connect();
  try {
    await waitFor(
      'the lease',
      async () => (await admin.query(`select owner from "${world.schema}".cursors where subscription = 'leased'`)).rows[0]?.owner != null,
    );
    // Another worker takes the partition over, as after a pause longer than the lease.
    await admin.query(`update "${world.schema}".cursors set owner = 'another-worker', epoch = epoch + 1 where subscription = 'leased'`);
    await waitFor('lease:lost', () => events.includes('lease:lost leased'));
    const { rows } = await admin.query('select pg_terminate_backend(pid) as cut from pg_stat_activity where application_name = $1', [
      `tidings-notifier:${world.schema}`,
    ]);
    assert.equal(rows.length, 1, 'the notifier had its connection');
    await waitFor('the notifier back', () => events.includes('connection:restored postgres'));
  } finally {
    await admin.end();
  }
  assert.ok(events.includes('connection:lost postgres'));
  assert.ok(lines.some((line) => line.msg === 'lease:lost' && line.subscription === 'leased' && line.level === 40));
  assert.ok(lines.some((line) => line.msg === 'connection:restored' && line.backbone === 'postgres' && line.level === 30));
  await bus.stop();
});
