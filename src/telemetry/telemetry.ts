/**
 * One bus's telemetry: traces and metrics through the OpenTelemetry API (when it is installed), the
 * `logger`, and the typed events. The bus calls it at three seams only: when it opens (load), around each
 * publish, and around the delivery handler it gives the backbone, which every backbone calls once per
 * attempt (through core/attempts.ts): so every backbone, and a broker behind an outbox, is observed alike.
 * Backbones reach it through `Backbone.observe` for what only they see: the outbox relay's spans, their
 * readers' receive spans, lost leases and connections.
 */
import type { Backbone, Delivery, DeliveryHandler, DeliveryResult } from '../core/backbone.ts';
import type { Envelope } from '../core/envelope.ts';
import { BusEventEmitter, type BusEvents } from './events.ts';
import { safely, type Logger } from './logger.ts';
import { BusMetrics } from './metrics.ts';
import { telemetryDefaults, type TelemetryOptions } from './options.ts';
import { loadOtel, recordsSpans } from './otel.ts';
import type { BackboneStatus } from './status.ts';
import { Tracing } from './tracing.ts';
import type { BackboneEventName, BackboneObserver, HopSpan, Received } from './observer.ts';

interface BusTelemetryOptions {
  readonly backbone: Backbone<unknown>;
  readonly telemetry: TelemetryOptions | false | undefined;
  readonly logger: Logger | undefined;
  /** The bus's warnings (onWarning, or the logger's warn, or the console). */
  readonly warn: (message: string, error?: unknown) => void;
}

export class BusTelemetry implements BackboneObserver {
  readonly events: BusEventEmitter;
  readonly #options: BusTelemetryOptions;
  #tracing: Tracing | undefined;
  /** Whether `#tracing`'s provider records spans now (see otel.ts `recordsSpans`). */
  #recording: () => boolean = () => false;
  #metrics: BusMetrics | undefined;
  #loading: Promise<void> | undefined;
  #status: { at: number; value: Promise<BackboneStatus | undefined> } | undefined;

  constructor(options: BusTelemetryOptions) {
    this.#options = options;
    this.events = new BusEventEmitter(options.warn);
  }

  /** Loads the OpenTelemetry API, if installed and wanted, and makes the tracer and instruments. Idempotent. */
  load(): Promise<void> {
    this.#loading ??= this.#load();
    return this.#loading;
  }

  async #load(): Promise<void> {
    const wanted = this.#options.telemetry;
    if (wanted === false || (wanted?.tracing === false && wanted?.metrics === false)) return;
    const api = await loadOtel(this.#options.warn);
    if (api === undefined) return;
    const system = this.#options.backbone.name;
    if (wanted?.tracing ?? telemetryDefaults.tracing) {
      const provider = (wanted?.tracerProvider as import('@opentelemetry/api').TracerProvider | undefined) ?? api.trace.getTracerProvider();
      this.#tracing = new Tracing(api, provider.getTracer(telemetryDefaults.scope), system);
      this.#recording = recordsSpans(api, provider);
    }
    if (wanted?.metrics ?? telemetryDefaults.metrics) {
      const provider = (wanted?.meterProvider as import('@opentelemetry/api').MeterProvider | undefined) ?? api.metrics.getMeterProvider();
      const meter = provider.getMeter(telemetryDefaults.scope);
      // The API's no-op meter (no SDK registered when the bus opened) stays no-op for good: record nothing.
      if (meter !== api.createNoopMeter()) {
        const backbone = this.#options.backbone;
        this.#metrics = new BusMetrics(meter, system, backbone.status === undefined ? undefined : () => this.status());
      }
    }
  }

  /**
   * The tracing, while spans can be recorded: undefined with no SDK behind the API, so nothing is built for them.
   * Private, like everything typed by `@opentelemetry/api`: the bus's declarations name only the seams below,
   * in Tidings' own types, so a user checking libraries needs no optional peer installed (test/declarations.unit.test.ts).
   */
  #recordingTracing(): Tracing | undefined {
    return this.#tracing !== undefined && this.#recording() ? this.#tracing : undefined;
  }

  /** The backbone's status, read at most every `telemetryDefaults.statusCacheMs` (gauges and health share it). */
  status(): Promise<BackboneStatus | undefined> {
    const read = this.#options.backbone.status?.bind(this.#options.backbone);
    if (read === undefined) return Promise.resolve(undefined);
    const now = Date.now();
    if (this.#status === undefined || now - this.#status.at >= telemetryDefaults.statusCacheMs) {
      this.#status = { at: now, value: read().catch(() => undefined) };
    }
    return this.#status.value;
  }

  /** `count` messages of `topic` were published. */
  published(topic: string, count: number): void {
    this.#metrics?.published(topic, count);
  }

  /**
   * The `send` span of a publish of `count` messages of `topic` (`id` the first's), a child of the handling
   * `delivery`'s process span when a handler publishes; undefined while tracing is off.
   */
  publishing(
    topic: string,
    count: number,
    id: string | undefined,
    given: { readonly traceparent?: string | undefined; readonly tracestate?: string | undefined },
    delivery: object | undefined,
  ): HopSpan | undefined {
    return this.#recordingTracing()?.publish(topic, count, id, given, delivery);
  }

  relay(envelope: Envelope, broker: string): HopSpan | undefined {
    return this.#recordingTracing()?.relay(envelope, broker);
  }

  receiving(system: string, subscription: string): Received | undefined {
    const tracing = this.#recordingTracing();
    if (tracing === undefined) return undefined;
    const startedAt = epochMs();
    return (messages, partition) => {
      if (messages.length > 0) tracing.receive(system, subscription, messages, partition, startedAt, epochMs());
    };
  }

  emit<E extends BackboneEventName>(name: E, event: BusEvents[E]): void {
    const logger = this.#options.logger;
    if (logger !== undefined) {
      const { error, ...fields } = event as { error?: unknown };
      const record = error === undefined ? fields : { ...fields, err: error };
      safely(() => (name === 'connection:restored' ? logger.info(record, name) : logger.warn(record, name)));
    }
    this.events.emit(name, event);
  }

  /**
   * The delivery handler the backbone calls for each attempt of `subscription`: `handle` in its process span,
   * timed and counted. Without tracing and metrics (no API installed, or turned off), `handle` itself: the
   * bus has loaded telemetry before it starts consumers, so this is decided once. With the API and no SDK,
   * `handle` too, after one check per attempt (an SDK may register later).
   */
  consumer<Tx>(subscription: string, handle: DeliveryHandler<Tx>): DeliveryHandler<Tx> {
    const metrics = this.#metrics;
    if (this.#tracing === undefined && metrics === undefined) return handle;
    return async (delivery) => {
      const tracing = this.#recordingTracing();
      if (tracing === undefined && metrics === undefined) return handle(delivery);
      const started = metrics === undefined ? 0 : performance.now();
      const result =
        tracing === undefined ? await handle(delivery) : await tracing.process(subscription, delivery as Delivery<unknown>, () => handle(delivery));
      metrics?.attempt(subscription, delivery.envelope.topic, result, (performance.now() - started) / 1_000, delivery.envelope.time);
      return result;
    };
  }

  /** An attempt of `subscription` failed: a log line and an event for the retry, the dead letter, the invalid message. */
  failed(subscription: string, { envelope, attempt }: Delivery<unknown>, result: Exclude<DeliveryResult, { outcome: 'ack' }>): void {
    const { events } = this;
    const logger = this.#options.logger;
    if (logger === undefined && !events.has('message:retry') && !events.has('message:dead-letter') && !events.has('message:invalid')) return;
    const message = { subscription, topic: envelope.topic, id: envelope.id, key: envelope.partitionkey, attempt };
    const log = { messageId: envelope.id, topic: envelope.topic, subscription, key: envelope.partitionkey, attempt, err: result.error };
    if (result.outcome === 'retry') {
      if (logger !== undefined)
        safely(() => logger.warn({ ...log, delayMs: result.delayMs }, `${subscription}: attempt ${attempt} of ${envelope.id} failed; retrying`));
      events.emit('message:retry', { ...message, delayMs: result.delayMs, error: result.error });
      return;
    }
    const invalid = isInvalid(result);
    if (logger !== undefined) {
      safely(() =>
        logger.error(
          { ...log, reason: result.reason },
          `${subscription}: ${invalid ? 'invalid message' : 'message'} ${envelope.id} sent to dead letters: ${result.reason}`,
        ),
      );
    }
    if (invalid) events.emit('message:invalid', { ...message, reason: result.reason, error: result.error });
    events.emit('message:dead-letter', { ...message, reason: result.reason, error: result.error });
  }
}

/** Now, in fractional epoch milliseconds from the monotonic clock: a span's start and end from one clock. */
function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

/**
 * A dead letter the pipeline (core/handler.ts) decided before any handler ran: the data failed the contract's
 * schema ("invalid payload: ..."), or the envelope could not be decoded or broke a limit (its reason is the
 * refusal's message).
 */
function isInvalid(result: { reason: string; error: { code?: string; message: string } }): boolean {
  if (result.reason.startsWith('invalid payload:')) return true;
  const { code } = result.error;
  return (code === 'UNDECODABLE_MESSAGE' || code === 'LIMIT_EXCEEDED') && result.reason === result.error.message;
}
