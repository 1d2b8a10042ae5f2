/**
 * tidings/metrics: a Prometheus endpoint for users who run no OpenTelemetry collector. It makes an
 * OpenTelemetry meter provider read by the OpenTelemetry Prometheus exporter (`@opentelemetry/sdk-metrics`
 * and `@opentelemetry/exporter-prometheus`, optional peer dependencies loaded here), to give the bus as
 * `telemetry.meterProvider`, and serves the text exposition format from your own HTTP server: a Node `http`
 * handler and a Fetch API one (Hono, Bun, Deno, Next.js route handlers). Proven by test/observability.pg.test.ts
 * and test/metrics.brokers.test.ts, which scrape it and parse the text.
 *
 *     const metrics = await prometheusMetrics();
 *     const bus = createBus({ service, backbone, telemetry: { meterProvider: metrics.meterProvider } });
 *     http.createServer((req, res) => (req.url === '/metrics' ? metrics.handler(req, res) : ...));
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { loadPackage } from '../core/packages.ts';
import type { MeterProviderLike } from '../telemetry/options.ts';

export interface PrometheusOptions {
  /** Prepended to every metric name (default none: `tidings_messages_handled_total`). */
  prefix?: string;
}

export interface PrometheusMetrics {
  /** Give it to the bus: `createBus({ ..., telemetry: { meterProvider } })` (several buses may share it). */
  readonly meterProvider: MeterProviderLike;
  /** Every metric now, in the Prometheus text exposition format (gauges read the backbone's status). */
  text(): Promise<string>;
  /** A Node `http` request handler answering with `text()`. */
  handler(request: IncomingMessage, response: ServerResponse): void;
  /** A Fetch API handler answering with `text()`. */
  fetch(request?: Request): Promise<Response>;
  /** Stops reading: the meter provider records nothing more. */
  shutdown(): Promise<void>;
}

/** The content type of the text exposition format, version 0.0.4. */
export const PROMETHEUS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

export async function prometheusMetrics(options: PrometheusOptions = {}): Promise<PrometheusMetrics> {
  const neededFor = 'tidings/metrics';
  const install = '@opentelemetry/api @opentelemetry/sdk-metrics @opentelemetry/exporter-prometheus';
  const sdk = await loadPackage(import('@opentelemetry/sdk-metrics'), '@opentelemetry/sdk-metrics', neededFor, install);
  const prometheus = await loadPackage(import('@opentelemetry/exporter-prometheus'), '@opentelemetry/exporter-prometheus', neededFor, install);
  const prefix = options.prefix ?? '';
  // The exporter is only the reader here: the serving is ours, so any HTTP server (or framework) can mount it.
  const exporter = new prometheus.PrometheusExporter({ preventServerStart: true, prefix });
  const serializer = new prometheus.PrometheusSerializer(prefix);
  const meterProvider = new sdk.MeterProvider({ readers: [exporter] });
  const text = async (): Promise<string> => {
    const { resourceMetrics } = await exporter.collect();
    return serializer.serialize(resourceMetrics);
  };
  return {
    meterProvider,
    text,
    handler(_request, response) {
      text().then(
        (body) => {
          response.writeHead(200, { 'content-type': PROMETHEUS_CONTENT_TYPE });
          response.end(body);
        },
        (error: unknown) => {
          response.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' });
          response.end(`# metrics could not be collected: ${(error as Error)?.message}\n`);
        },
      );
    },
    async fetch() {
      try {
        return new Response(await text(), { status: 200, headers: { 'content-type': PROMETHEUS_CONTENT_TYPE } });
      } catch (error) {
        return new Response(`# metrics could not be collected: ${(error as Error)?.message}\n`, { status: 500 });
      }
    },
    shutdown: () => meterProvider.shutdown(),
  };
}
