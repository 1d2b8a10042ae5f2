/**
 * Loads `@opentelemetry/api` when a bus opens. It is an optional peer dependency: not installed means no
 * telemetry, silently (nothing is recorded and nothing costs); installed but failing to load is said once.
 * The import is written out here so bundlers see it.
 */
import type * as Api from '@opentelemetry/api';
import type { TracerProvider } from '@opentelemetry/api';
import { isNotInstalled, packageError } from '../core/packages.ts';

export type OtelApi = typeof Api;

export async function loadOtel(warn: (message: string, error?: unknown) => void): Promise<OtelApi | undefined> {
  try {
    return await import('@opentelemetry/api');
  } catch (cause) {
    // Not installed is the ordinary way to run without telemetry; a broken install is worth a line.
    if (!isNotInstalled(cause, '@opentelemetry/api')) {
      warn(`${packageError(cause, '@opentelemetry/api', 'Tracing and metrics').message}; the bus runs without traces and metrics`, cause);
    }
    return undefined;
  }
}

/**
 * Whether `provider` records spans now. The API's global provider is a proxy that hands out no-op tracers
 * until an SDK registers behind it, which may happen after the bus opened: so this is asked at each publish,
 * attempt and read (two property reads), and while it says no, no span, parent or link is built (the
 * benchmark's no-op row: bench/README.md). A provider given in `telemetry.tracerProvider` always records.
 */
export function recordsSpans(api: OtelApi, provider: TracerProvider): () => boolean {
  if (!(provider instanceof api.ProxyTracerProvider)) return () => true;
  const noop = new api.ProxyTracerProvider().getDelegate();
  return () => provider.getDelegate() !== noop;
}
