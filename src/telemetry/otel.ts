/**
 * Loads `@opentelemetry/api` when a bus opens. It is an optional peer dependency: not installed means no
 * telemetry, silently (nothing is recorded and nothing costs); installed but failing to load is said once.
 * The import is written out here so bundlers see it.
 */
import type * as Api from '@opentelemetry/api';
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
