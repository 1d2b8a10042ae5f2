/**
 * The options of Tidings' telemetry, and their defaults in one place. Traces and metrics go through the
 * OpenTelemetry API (`@opentelemetry/api`, an optional peer dependency): when it is installed the bus uses
 * the providers registered with it (or the ones given here); when it is not, nothing is recorded and nothing
 * is paid. Logs and events need no package.
 */
import { optionNames, type OptionProblems } from '../core/options.ts';
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

/** Adds to `problems` what is wrong with the bus's `telemetry` and `logger` options, by name. */
export function checkTelemetryOptions(problems: OptionProblems, telemetry: unknown, logger: unknown): void {
  if (telemetry !== undefined && telemetry !== false) {
    problems.check(typeof telemetry === 'object' && telemetry !== null, 'telemetry must be false or { tracerProvider, meterProvider, tracing, metrics }');
    if (typeof telemetry === 'object' && telemetry !== null) {
      problems.unknownKeys(telemetry, optionNames<TelemetryOptions>()('tracerProvider', 'meterProvider', 'tracing', 'metrics'), 'telemetry.');
      const { tracerProvider, meterProvider, tracing, metrics } = telemetry as TelemetryOptions;
      problems.check(
        tracerProvider === undefined || typeof tracerProvider?.getTracer === 'function',
        'telemetry.tracerProvider must be an OpenTelemetry TracerProvider (with getTracer)',
      );
      problems.check(
        meterProvider === undefined || typeof meterProvider?.getMeter === 'function',
        'telemetry.meterProvider must be an OpenTelemetry MeterProvider (with getMeter)',
      );
      problems.oneOf('telemetry.tracing', tracing, [true, false]);
      problems.oneOf('telemetry.metrics', metrics, [true, false]);
    }
  }
  if (logger !== undefined) {
    const methods = ['error', 'warn', 'info'] as const;
    const missing = methods.filter((method) => typeof (logger as Record<string, unknown> | null)?.[method] !== 'function');
    problems.check(
      missing.length === 0,
      `logger must be pino-style, with ${methods.join(', ')} methods taking (record, message); it lacks ${missing.join(', ')}`,
    );
  }
}

export type { Logger };
