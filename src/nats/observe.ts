/**
 * What the NATS backbone tells the bus's telemetry (src/telemetry): its connection's drops and returns (from
 * nats.js's status events: it reconnects by itself), and whether the server answers, for `bus.health()`.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import { healthDefaults } from '../telemetry/health.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { HealthCheck } from '../telemetry/status.ts';

/** Emits `connection:lost` and `connection:restored` for `nc` until it closes. */
export function watchConnection(nc: NatsConnection, observer: () => BackboneObserver | undefined): void {
  void (async () => {
    for await (const status of nc.status()) {
      if (status.type === 'disconnect') observer()?.emit('connection:lost', { backbone: 'nats', detail: `NATS at ${status.server}` });
      else if (status.type === 'reconnect') observer()?.emit('connection:restored', { backbone: 'nats', detail: `NATS at ${status.server}` });
    }
  })().catch(() => undefined);
}

/** The server answers a round trip (a flush) within half the health check's time. */
export async function natsHealth(nc: NatsConnection, servers: readonly string[]): Promise<HealthCheck[]> {
  const where = `NATS at ${servers.join(', ')}`;
  if (nc.isClosed()) return [{ name: 'broker', ok: false, detail: `the connection to ${where} is closed` }];
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<Error>((resolve) => {
    timer = setTimeout(() => resolve(new Error(`no answer within ${healthDefaults.timeoutMs / 2} ms`)), healthDefaults.timeoutMs / 2);
  });
  try {
    const answer = await Promise.race([
      nc.flush().then(
        () => undefined,
        (error: unknown) => error as Error,
      ),
      late,
    ]);
    if (answer === undefined) return [{ name: 'broker', ok: true, detail: `connected to ${where}` }];
    return [{ name: 'broker', ok: false, detail: `${where} is unreachable: ${answer.message}` }];
  } finally {
    clearTimeout(timer);
  }
}
