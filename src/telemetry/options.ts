/**
 * The options of Tidings' telemetry, and their defaults in one place. Traces and metrics go through the
 * OpenTelemetry API (`@opentelemetry/api`, an optional peer dependency): when it is installed the bus uses
 * the providers registered with it (or the ones given here); when it is not, nothing is recorded and nothing
 * is paid. Logs and events need no package.
 */
import type { Logger } from './logger.ts';

/** The part of an OpenTelemetry `TracerProvider` Tidings calls (typed loosely so Tidings' types never need the API installed). */
export interface TracerProviderLike {
  getTracer(name: string, version?: string): object;
}

/** The part of an OpenTelemetry `MeterProvider` Tidings calls. */
export interface MeterProviderLike {
  getMeter(name: string, version?: string): object;
}

export interface TelemetryOptions {
  /** Where spans go: the provider registered with the OpenTelemetry API by default (`trace.getTracerProvider()`). */
  tracerProvider?: TracerProviderLike;
  /** Where metrics go: the API's global provider by default; `tidings/metrics` makes one for a Prometheus endpoint. */
  meterProvider?: MeterProviderLike;
  /** Record spans (default true when `@opentelemetry/api` is installed). */
  tracing?: boolean;
  /** Record metrics (default true when `@opentelemetry/api` is installed). */
  metrics?: boolean;
}

/** What the bus's `logger` and `telemetry` options mean when they are not given. */
export const telemetryDefaults = {
  /** The instrumentation scope's name, on every span and metric. */
  scope: 'tidings',
  tracing: true,
  metrics: true,
  /**
   * How long a backbone's status (lag, held keys, dead letters) is reused by the observable gauges and
   * `bus.health()`: a scrape every few seconds must not become a status query every few seconds per process.
   */
  statusCacheMs: 5_000,
} as const satisfies Required<Pick<TelemetryOptions, 'tracing' | 'metrics'>> & Record<string, unknown>;

/** The bus options this module reads, resolved. */
export interface ResolvedTelemetry {
  readonly telemetry: TelemetryOptions | false;
  readonly logger: Logger | undefined;
}

export type { Logger };
