/**
 * The one AMQP connection of a RabbitMQ backbone, kept alive: when it drops, it is opened again with
 * backoff, and whoever needs it (the publisher, each consumer) waits for it and builds its channels again.
 * Channels are not kept here: each user owns its channels and watches their `close` event, because a
 * channel also closes alone (a refused declaration) while the connection stays up.
 */
import type { ChannelModel, ConfirmChannel } from 'amqplib';
import { TidingsError } from '../core/errors.ts';
import { loadPackage } from '../core/packages.ts';
import { sleep } from '../core/sleep.ts';

interface LinkSettings {
  readonly url: string;
  readonly connectTimeoutMs: number;
  readonly heartbeatSeconds: number;
  readonly reconnectMinMs: number;
  readonly reconnectMaxMs: number;
  readonly connectionName: string;
  readonly warn: (message: string, error?: unknown) => void;
  /** Told when the connection drops (`true`) and when a new one is open after it (`false`): the bus's events. */
  readonly connection?: ((lost: boolean, error?: unknown) => void) | undefined;
}

export class Link {
  readonly #settings: LinkSettings;
  #connection: ChannelModel | undefined;
  #connecting: Promise<ChannelModel> | undefined;
  #closed = false;
  /** The connection dropped and none is open since. */
  #lost = false;
  readonly #closing = new AbortController();

  constructor(settings: LinkSettings) {
    this.#settings = settings;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Aborted when the link is closed: waits on the connection end with it. */
  get signal(): AbortSignal {
    return this.#closing.signal;
  }

  /**
   * The open connection; waits for one (reconnecting with backoff) until `deadline` (epoch ms), then fails
   * with a retryable BACKBONE_UNAVAILABLE.
   */
  async connection(deadline = Number.POSITIVE_INFINITY): Promise<ChannelModel> {
    if (this.#connection !== undefined) return this.#connection;
    this.#connecting ??= this.#connect().finally(() => {
      this.#connecting = undefined;
    });
    if (deadline === Number.POSITIVE_INFINITY) return this.#connecting;
    let timer: NodeJS.Timeout | undefined;
    const waitMs = Math.max(0, Math.round(deadline - Date.now()));
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            this.#unavailable(`no connection within ${waitMs} ms (is the server up and accepting AMQP connections? raise connectTimeoutMs for a slow start)`),
          ),
        waitMs,
      );
    });
    try {
      return await Promise.race([this.#connecting, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Whether `queue` exists; looked up on a channel of its own, since a missing queue closes the channel that asks. */
  async queueExists(queue: string, deadline?: number): Promise<boolean> {
    const probe = await this.confirmChannel(deadline);
    try {
      await probe.checkQueue(queue);
      return true;
    } catch (error) {
      if ((error as { code?: unknown }).code === 404) return false;
      throw error;
    } finally {
      // Not awaited: the answer is known, and the close's round trip need not hold up the caller.
      probe.close().catch(() => undefined);
    }
  }

  async confirmChannel(deadline?: number): Promise<ConfirmChannel> {
    for (;;) {
      const connection = await this.connection(deadline);
      try {
        const channel = await connection.createConfirmChannel();
        // A channel closed by the server emits 'error' then 'close'; users act on 'close'.
        channel.on('error', () => undefined);
        return channel;
      } catch (error) {
        // The connection went away between the two calls: wait for the next one.
        if (this.#closed) throw this.#unavailable('the backbone is closed', error);
        if (deadline !== undefined && Date.now() > deadline) throw this.#unavailable('could not open a channel', error);
        await sleep(this.#settings.reconnectMinMs, this.#closing.signal);
      }
    }
  }

  async #connect(): Promise<ChannelModel> {
    const s = this.#settings;
    // Loaded here, not imported at the top: without amqplib, importing tidings/rabbitmq would fail with
    // Node's bare "Cannot find package" instead of this error naming it (not retried: installing takes a person).
    const { connect } = await loadPackage(import('amqplib'), 'amqplib', 'The RabbitMQ backbone');
    for (let attempt = 0, waitMs = s.reconnectMinMs; ; attempt++, waitMs = Math.min(waitMs * 2, s.reconnectMaxMs)) {
      if (this.#closed) throw this.#unavailable('the backbone is closed');
      try {
        const connection = await connect(withHeartbeat(s.url, s.heartbeatSeconds), {
          timeout: s.connectTimeoutMs,
          clientProperties: { connection_name: s.connectionName },
        });
        if (this.#closed) {
          await connection.close().catch(() => undefined);
          throw this.#unavailable('the backbone is closed');
        }
        connection.on('error', (error: Error) => s.warn(`RabbitMQ connection error (${redact(s.url)})`, error));
        connection.on('close', () => {
          if (this.#connection === connection) this.#connection = undefined;
          if (this.#closed) return;
          s.warn(`RabbitMQ connection to ${redact(s.url)} closed; reconnecting`);
          this.#lost = true;
          s.connection?.(true);
        });
        connection.on('blocked', (reason: string) => s.warn(`RabbitMQ blocked publishing on this connection: ${reason}`));
        this.#connection = connection;
        if (this.#lost) {
          this.#lost = false;
          s.connection?.(false);
        }
        if (attempt > 0) s.warn(`RabbitMQ connection to ${redact(s.url)} restored after ${attempt} failed attempt${attempt === 1 ? '' : 's'}`);
        return connection;
      } catch (error) {
        if (this.#closed) throw this.#unavailable('the backbone is closed', error);
        if (attempt === 0 || attempt % 10 === 0) s.warn(`Cannot connect to RabbitMQ at ${redact(s.url)}; retrying in ${waitMs} ms`, error);
        await sleep(waitMs, this.#closing.signal);
      }
    }
  }

  #unavailable(what: string, cause?: unknown): TidingsError {
    return new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `RabbitMQ at ${redact(this.#settings.url)} is unavailable: ${what}${cause instanceof Error ? ` (${cause.message})` : ''}`,
      {
        retryable: !this.#closed,
        cause,
      },
    );
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#closing.abort();
    const connection = this.#connection;
    this.#connection = undefined;
    await connection?.close().catch(() => undefined);
  }
}

function withHeartbeat(url: string, seconds: number): string {
  const parsed = new URL(url);
  if (!parsed.searchParams.has('heartbeat')) parsed.searchParams.set('heartbeat', String(seconds));
  return parsed.toString();
}

/** The URL without its password, for messages. */
export function redact(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password !== '') parsed.password = '***';
    return parsed.toString();
  } catch {
    return '(an unparsable URL)';
  }
}
