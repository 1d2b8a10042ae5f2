/** The NATS connection of a backbone: opened once, reconnecting for ever (the client does), named in the server's list. */
import { hostname } from 'node:os';
import type { NatsConnection } from '@nats-io/transport-node';
import { TidingsError } from '../core/errors.ts';
import type { NatsClient } from './client.ts';
import type { NatsSettings } from './options.ts';

/** Connects, or fails with a retryable BACKBONE_UNAVAILABLE naming the servers. */
export async function connect(transport: NatsClient['transport'], s: NatsSettings): Promise<NatsConnection> {
  try {
    return await transport.connect({
      servers: s.servers,
      name: `tidings ${hostname()}:${process.pid}`,
      maxReconnectAttempts: -1,
      reconnectTimeWait: s.reconnectWaitMs,
      reconnectJitter: Math.min(100, s.reconnectWaitMs),
      timeout: s.publishTimeoutMs,
    });
  } catch (error) {
    throw new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `Cannot connect to NATS at ${s.servers.join(', ')}: ${(error as Error).message}; start the server or check servers`,
      {
        cause: error,
        retryable: true,
      },
    );
  }
}
