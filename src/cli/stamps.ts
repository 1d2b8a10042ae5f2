/**
 * Read-only commands across the stamps of a backbone per tenant (config.ts): each stamp is read on its own
 * connection, all at once; one that cannot be read is shown with the reason while the others print, and the
 * exit code then says so (3 when every failure was an unreachable stamp, else 1).
 */
import { TidingsError } from 'tidings';
import { everyStamp, type GlobalOptions } from './config.ts';
import { CommandFailed, emit, type CliContext } from './context.ts';
import { describeUrl } from './internals.ts';

/** One stamp's reading, or why there is none. */
export type StampReading<T> =
  | { readonly tenant: string; readonly where: string; readonly value: T }
  | { readonly tenant: string; readonly where: string; readonly error: { readonly code: string; readonly message: string } };

/** True when a read-only command runs on every stamp: stamps are configured and --stamp names none. */
export function acrossStamps(settings: GlobalOptions): boolean {
  return settings.stamps.length > 0 && settings.tenant === undefined;
}

/** Reads every stamp with `read`, each given its own globals; never rejects (a failure is that stamp's reading). */
export async function readStamps<T>(settings: GlobalOptions, read: (globals: GlobalOptions) => Promise<T>): Promise<StampReading<T>[]> {
  return Promise.all(
    everyStamp(settings).map(async (globals): Promise<StampReading<T>> => {
      const tenant = globals.tenant ?? '';
      const where = whereOf(globals);
      try {
        return { tenant, where, value: await read(globals) };
      } catch (error) {
        const code = error instanceof TidingsError ? error.code : 'FAILED';
        return { tenant, where, error: { code, message: error instanceof Error ? error.message : String(error) } };
      }
    }),
  );
}

/**
 * Shows the readings: JSON keyed by tenant (a failed stamp's value is `{"error": {code, message}}`), or
 * `human`'s text. Then fails, naming the stamps that could not be read, if any.
 */
export function emitStamps<T>(context: CliContext, settings: GlobalOptions, readings: readonly StampReading<T>[], human: () => string): void {
  const byTenant = Object.fromEntries(readings.map((reading) => [reading.tenant, 'error' in reading ? { error: reading.error } : reading.value]));
  emit(context, settings, byTenant, human);
  const failed = readings.filter((reading) => 'error' in reading);
  if (failed.length === 0) return;
  // Each reason is in the output already, beside its tenant.
  const message = `${failed.length} of ${readings.length} stamps could not be read: ${failed.map((reading) => reading.tenant).join(', ')} (the reasons are shown with them)`;
  if (failed.every((reading) => 'error' in reading && reading.error.code === 'BACKBONE_UNAVAILABLE')) throw new TidingsError('BACKBONE_UNAVAILABLE', message);
  throw new CommandFailed(message);
}

/** Each stamp's text under a heading naming its tenant; a stamp that failed shows why instead. */
export function sections<T>(readings: readonly StampReading<T>[], render: (value: T) => string): string {
  return readings
    .map(
      (reading) => `== tenant ${reading.tenant} (${reading.where}) ==\n${'error' in reading ? `cannot read: ${reading.error.message}` : render(reading.value)}`,
    )
    .join('\n\n');
}

/** Where a stamp is, without a password: its schema and database, or its broker with the prefix or stream. */
function whereOf(globals: GlobalOptions): string {
  const url = globals.url === undefined ? undefined : describeUrl(globals.url);
  if (url === undefined) return `schema ${globals.schema}`;
  if (/^amqps?:/.test(url)) return `${url}${globals.prefix === undefined ? '' : ` prefix ${globals.prefix}`}`;
  if (/^nats:/.test(url)) return `${url}${globals.stream === undefined ? '' : ` stream ${globals.stream}`}`;
  return `schema ${globals.schema} at ${url}`;
}
