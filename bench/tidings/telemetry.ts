/**
 * Issue 22's overhead rows (group `tracing` in bench/harness/plan.ts): the bus's `telemetry` option for the
 * task's variant. `off`: `false`, the path a bus takes without `@opentelemetry/api` (the API is never
 * imported); `noop`: the default, the API with no SDK registered (non-recording spans, no-op instruments), as
 * every other row runs; `sdk`: OpenTelemetry's SDK in this process, every span sampled (the default sampler)
 * into an in-memory exporter through the batch processor a service would use (its queue large enough that
 * no span is dropped), and the metrics read every 5 s as a scrape would (the gauges query the status then).
 */
import { AggregationTemporality, InMemoryMetricExporter, MeterProvider, PeriodicExportingMetricReader } from '@opentelemetry/sdk-metrics';
import { BatchSpanProcessor, InMemorySpanExporter, TracerProvider } from '@opentelemetry/sdk-trace';
import type { TelemetryOptions } from '../../src/index.ts';
import type { Variant } from '../protocol.ts';

let sdk: TelemetryOptions | undefined;

/** `createBus`'s `telemetry` for `variant`; undefined: the default. One SDK per process, shared by its buses. */
export function telemetryOf(variant: Variant): TelemetryOptions | false | undefined {
  if (variant.telemetry === 'off') return false;
  if (variant.telemetry !== 'sdk') return undefined;
  sdk ??= sdkTelemetry();
  return sdk;
}

function sdkTelemetry(): TelemetryOptions {
  const spans = new InMemorySpanExporter();
  const processor = new BatchSpanProcessor({ exporter: spans, maxQueueSize: 1 << 18, maxExportBatchSize: 4_096, scheduledDelayMillis: 200 });
  const tracerProvider = new TracerProvider({ spanProcessors: [processor] });
  const metrics = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  const meterProvider = new MeterProvider({ readers: [new PeriodicExportingMetricReader({ exporter: metrics, exportIntervalMillis: 5_000 })] });
  // What was exported is let go: a long row must not keep every span in memory.
  const forget = setInterval(() => {
    spans.reset();
    metrics.reset();
  }, 1_000);
  forget.unref();
  return { tracerProvider, meterProvider };
}
