/**
 * The status gauges on RabbitMQ and NATS, parsed from a `tidings/metrics` scrape: lag per partition, the
 * oldest unhandled age, held keys and dead letters of a subscription this process consumes, with one key's
 * handler held up, one key waiting for a delayed retry and one message dead-lettered. What each broker can
 * tell is in src/rabbitmq/observe.ts and src/nats/observe.ts.
 */
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { createBus, deadLetter, retryLater, type Backbone, type Bus } from '../src/index.ts';
import { prometheusMetrics } from '../src/metrics/index.ts';
import { nats } from '../src/nats/index.ts';
import { rabbitmq } from '../src/rabbitmq/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { natsNamespace } from './fixtures/nats.ts';
import { deleteByPrefix } from './fixtures/rabbitmq.ts';
import { RABBITMQ_URL, requireBroker, sleep, waitFor } from './helpers.ts';

const buses: Bus<unknown>[] = [];
const cleanups: Array<() => Promise<void>> = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const cleanup of cleanups) await cleanup().catch(() => undefined);
});

interface Sample {
  readonly labels: Record<string, string>;
  readonly value: number;
}

/** The samples of gauge `name` for subscription `group`. */
function samples(text: string, name: string, group: string): Sample[] {
  const family = parsePrometheusTextFormat(text).find((candidate) => candidate.name === name);
  return (family?.metrics ?? [])
    .filter((metric) => metric.labels?.messaging_consumer_group_name === group)
    .map((metric) => ({ labels: metric.labels ?? {}, value: Number(metric.value) }));
}

const sum = (found: readonly Sample[]) => found.reduce((total, sample) => total + sample.value, 0);

/**
 * Three messages of key `slow` whose handler waits (1 running, 2 behind it), one of key `held` waiting a minute
 * for its retry, one of key `dead` dead-lettered: lag 4 (the held message is not handled either), 1 held key,
 * 1 dead letter, and an age for the oldest unhandled message.
 */
async function gauges(backbone: Backbone<unknown>, system: string, partitions: number): Promise<void> {
  const metrics = await prometheusMetrics();
  cleanups.unshift(() => metrics.shutdown());
  const bus = createBus({ service: 'gauged', backbone, telemetry: { meterProvider: metrics.meterProvider, tracing: false } });
  buses.push(bus);
  let release!: () => void;
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  cleanups.unshift(async () => release());
  let started = 0;
  bus.subscribe(
    'gauged',
    Ticked,
    async (message) => {
      if (message.data.key === 'held') return retryLater(60_000, 'not yet');
      if (message.data.key === 'dead') return deadLetter('refused');
      started++;
      await gate;
    },
    { partitions },
  );
  await bus.start();
  await bus.publishMany(Ticked, [
    { key: 'slow', seq: 1 },
    { key: 'slow', seq: 2 },
    { key: 'slow', seq: 3 },
    { key: 'held', seq: 1 },
    { key: 'dead', seq: 1 },
  ]);
  let text = '';
  await waitFor(
    'lag 4, one held key, one dead letter in the scrape',
    async () => {
      await sleep(100); // the gauges read a status cached for seconds: no need to scrape flat out
      text = await metrics.text();
      return (
        started === 1 &&
        sum(samples(text, 'tidings_subscription_lag', 'gauged')) === 4 &&
        sum(samples(text, 'tidings_subscription_held_keys', 'gauged')) === 1 &&
        sum(samples(text, 'tidings_subscription_dead_letters', 'gauged')) === 1
      );
    },
    30_000,
  );
  const lags = samples(text, 'tidings_subscription_lag', 'gauged');
  assert.deepEqual(
    lags.map((sample) => sample.labels.messaging_destination_partition_id).sort(),
    Array.from({ length: partitions }, (_, partition) => String(partition)).sort(),
    'a lag per partition',
  );
  assert.ok(lags.every((sample) => sample.labels.messaging_system === system));
  const slow = lags.find((sample) => sample.value >= 3);
  assert.ok(slow, `the slow key's partition has its three messages: ${JSON.stringify(lags)}`);
  const age = samples(text, 'tidings_subscription_oldest_unhandled_age', 'gauged').find(
    (sample) => sample.labels.messaging_destination_partition_id === slow.labels.messaging_destination_partition_id,
  );
  assert.ok(age !== undefined && age.value >= 0, `an oldest unhandled age for that partition: ${text}`);
  release();
  await waitFor(
    'the slow key handled: lag 1 (the held message)',
    async () => {
      await sleep(100);
      return sum(samples(await metrics.text(), 'tidings_subscription_lag', 'gauged')) === 1;
    },
    30_000,
  );
  await bus.stop();
}

test('RabbitMQ: lag per partition queue, oldest unhandled age, held keys and dead letters, from tidings/metrics', async (t) => {
  if (!(await requireBroker(t, 'RabbitMQ', RABBITMQ_URL))) return;
  const prefix = `gauge_${process.pid}_${Math.random().toString(36).slice(2, 8)}.`;
  cleanups.push(() => deleteByPrefix(prefix));
  await gauges(rabbitmq({ url: RABBITMQ_URL, prefix, reconnectMinMs: 50, reconnectMaxMs: 500, onWarning: () => undefined }), 'rabbitmq', 2);
});

test('NATS JetStream: lag per bucket consumer, oldest unhandled age, held keys and dead letters, from tidings/metrics', async (t) => {
  const namespace = await natsNamespace(t, 'gauge');
  if (namespace === undefined) return;
  cleanups.push(() => namespace.cleanup());
  await gauges(nats(namespace.options()), 'nats', 4);
});
