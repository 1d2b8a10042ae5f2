/**
 * The bus's metrics, through the OpenTelemetry metrics API: what this process published and handled
 * (counters and histograms, recorded as it happens), and what the backbone reports about its subscriptions
 * (observable gauges, read when the metrics are collected). Names follow the messaging semantic conventions
 * where they have one (`messaging.client.sent.messages`, `messaging.process.duration`); the rest are
 * `tidings.*`. The Prometheus endpoint (`tidings/metrics`) exposes the same instruments.
 */
import type { Attributes, Counter, Histogram, Meter } from '@opentelemetry/api';
import type { DeliveryResult } from '../core/backbone.ts';
import { CONSUMER_GROUP, DESTINATION, ERROR_TYPE, MESSAGING_SYSTEM, OPERATION_NAME, PARTITION } from './attributes.ts';
import type { BackboneStatus } from './status.ts';

/** Seconds, from a handler's milliseconds to several minutes of latency. */
const SECONDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

export class BusMetrics {
  readonly #sent: Counter;
  readonly #handled: Counter;
  readonly #failed: Counter;
  readonly #retried: Counter;
  readonly #deadLettered: Counter;
  readonly #duration: Histogram;
  readonly #latency: Histogram;
  /** Attribute sets by subscription (`undefined` for publishes) and topic, made once: metrics are recorded for every message. */
  readonly #attributes = new Map<string | undefined, Map<string, Attributes>>();

  constructor(
    meter: Meter,
    private readonly system: string,
    status: (() => Promise<BackboneStatus | undefined>) | undefined,
  ) {
    this.#sent = meter.createCounter('messaging.client.sent.messages', {
      unit: '{message}',
      description: 'Messages published (written, or enlisted in a transaction)',
    });
    this.#handled = meter.createCounter('tidings.messages.handled', { unit: '{message}', description: 'Attempts that succeeded' });
    this.#failed = meter.createCounter('tidings.messages.failed', { unit: '{attempt}', description: 'Attempts that failed (retried or dead-lettered)' });
    this.#retried = meter.createCounter('tidings.messages.retried', { unit: '{attempt}', description: 'Failed attempts to be tried again' });
    this.#deadLettered = meter.createCounter('tidings.messages.dead_lettered', { unit: '{message}', description: 'Messages sent to dead letters' });
    this.#duration = meter.createHistogram('messaging.process.duration', {
      unit: 's',
      description: "Duration of one attempt: the handler, its middleware and the message's checks",
      advice: { explicitBucketBoundaries: SECONDS },
    });
    this.#latency = meter.createHistogram('tidings.message.latency', {
      unit: 's',
      description: 'From publication (the envelope time) to a successful attempt',
      advice: { explicitBucketBoundaries: SECONDS },
    });
    if (status !== undefined) this.#observe(meter, status);
  }

  published(topic: string, count: number): void {
    this.#sent.add(count, this.#of(topic, undefined));
  }

  /** One attempt of `subscription` on a message of `topic` ended with `result` after `seconds`; `published` is the envelope's time. */
  attempt(subscription: string, topic: string, result: DeliveryResult, seconds: number, published: string): void {
    const attributes = this.#of(topic, subscription);
    if (result.outcome === 'ack') {
      this.#handled.add(1, attributes);
      this.#duration.record(seconds, attributes);
      const age = (Date.now() - Date.parse(published)) / 1_000;
      if (Number.isFinite(age)) this.#latency.record(Math.max(age, 0), attributes);
      return;
    }
    const failed = { ...attributes, [ERROR_TYPE]: result.error.code ?? result.error.name ?? 'Error' };
    this.#duration.record(seconds, failed);
    this.#failed.add(1, failed);
    if (result.outcome === 'retry') this.#retried.add(1, attributes);
    else this.#deadLettered.add(1, attributes);
  }

  #of(topic: string, subscription: string | undefined): Attributes {
    let byTopic = this.#attributes.get(subscription);
    if (byTopic === undefined) {
      byTopic = new Map();
      this.#attributes.set(subscription, byTopic);
    }
    let attributes = byTopic.get(topic);
    if (attributes === undefined) {
      attributes =
        subscription === undefined
          ? { [MESSAGING_SYSTEM]: this.system, [OPERATION_NAME]: 'send', [DESTINATION]: topic }
          : { [MESSAGING_SYSTEM]: this.system, [OPERATION_NAME]: 'process', [DESTINATION]: topic, [CONSUMER_GROUP]: subscription };
      byTopic.set(topic, attributes);
    }
    return attributes;
  }

  /** The gauges the backbone's status feeds, read together in one callback (one status query per collection). */
  #observe(meter: Meter, status: () => Promise<BackboneStatus | undefined>): void {
    const lag = meter.createObservableGauge('tidings.subscription.lag', {
      unit: '{message}',
      description: 'Messages committed and not yet handled, per partition',
    });
    const oldest = meter.createObservableGauge('tidings.subscription.oldest_unhandled_age', {
      unit: 's',
      description: 'Age of the oldest message not yet handled, per partition',
    });
    const held = meter.createObservableGauge('tidings.subscription.held_keys', { unit: '{key}', description: 'Keys waiting for a delayed retry' });
    const dead = meter.createObservableGauge('tidings.subscription.dead_letters', { unit: '{message}', description: 'Messages in dead letters' });
    const backlog = meter.createObservableGauge('tidings.relay.backlog', { unit: '{message}', description: 'Outbox messages not yet handed to the broker' });
    const backlogAge = meter.createObservableGauge('tidings.relay.oldest_age', { unit: 's', description: 'Age of the oldest outbox message not yet relayed' });
    meter.addBatchObservableCallback(
      async (observer) => {
        const state = await status().catch(() => undefined);
        if (state === undefined) return;
        for (const subscription of state.subscriptions) {
          const base = { [MESSAGING_SYSTEM]: this.system, [CONSUMER_GROUP]: subscription.name };
          observer.observe(held, subscription.heldKeys, base);
          observer.observe(dead, subscription.deadLetters, base);
          for (const partition of subscription.partitions) {
            const attributes = { ...base, [PARTITION]: String(partition.partition) };
            observer.observe(lag, partition.lag, attributes);
            // Not observed where the backbone cannot tell (see each backbone's observe.ts), rather than a false 0.
            if (partition.oldestUnhandledAgeMs !== undefined) observer.observe(oldest, (partition.oldestUnhandledAgeMs ?? 0) / 1_000, attributes);
          }
        }
        if (state.relay !== undefined) {
          observer.observe(backlog, state.relay.backlog, { [MESSAGING_SYSTEM]: this.system });
          observer.observe(backlogAge, (state.relay.oldestAgeMs ?? 0) / 1_000, { [MESSAGING_SYSTEM]: this.system });
        }
      },
      [lag, oldest, held, dead, backlog, backlogAge],
    );
  }
}
