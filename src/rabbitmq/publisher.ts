/**
 * Publishing with publisher confirms on one confirm channel. Every publish writes its messages at once and
 * waits for their confirms, so concurrent publishes pipeline on the channel (thousands in flight) instead
 * of waiting one confirm at a time. If the channel or connection fails before a message is confirmed, the
 * unconfirmed messages of that call are published again, in their order, on the next channel, until
 * `publishTimeoutMs` has passed; then the call fails with a retryable BACKBONE_UNAVAILABLE. A message
 * published again may arrive twice (it may have reached the broker before the failure): inboxes remove
 * such duplicates by id.
 *
 * A message RabbitMQ can never take fails at once, and for good (`retryable: false`), so that nobody waits
 * for it or publishes it again: one over AMQP's limits (codec.ts, `wireProblem`) or that the client cannot
 * encode, before anything is sent; one over the server's `max_message_size`, when the server refuses it
 * (the others of the call are published still). (Tests: input.rabbitmq.)
 */
import type { ConfirmChannel } from 'amqplib';
import type { Outgoing } from '../core/backbone.ts';
import { storable, TidingsError } from '../core/errors.ts';
import { encode, routingKey, wireProblem } from './codec.ts';
import { sleep } from '../core/sleep.ts';
import { redact, type Link } from './connection.ts';
import { declareExchange, type Names } from './topology.ts';

interface PublisherSettings {
  readonly publishTimeoutMs: number;
  readonly reconnectMinMs: number;
  readonly url: string;
}

interface OpenChannel {
  readonly channel: ConfirmChannel;
  /** Topic exchanges declared on this channel: declared once per channel, not per publish. */
  readonly declared: Map<string, Promise<void>>;
  closed: boolean;
  /** Why the server closed the channel, if it did. */
  closedBy: Error | undefined;
  drained: Promise<void> | undefined;
}

interface Pending {
  readonly message: Outgoing;
  readonly encoded: ReturnType<typeof encode>;
  readonly exchange: string;
  readonly key: string;
}

/** RabbitMQ's words when a message is over its `max_message_size`. */
const TOO_LARGE = /message size (\d+) is larger than configured max size (\d+)/;

export class Publisher {
  readonly #link: Link;
  readonly #names: Names;
  readonly #settings: PublisherSettings;
  #current: Promise<OpenChannel> | undefined;
  /** The server's max_message_size, once a refusal told it. */
  #serverMaxBytes: number | undefined;

  constructor(link: Link, names: Names, settings: PublisherSettings) {
    this.#link = link;
    this.#names = names;
    this.#settings = settings;
  }

  async publish(messages: readonly Outgoing[]): Promise<void> {
    if (messages.length === 0) return;
    const deadline = Date.now() + this.#settings.publishTimeoutMs;
    let pending = messages.map((message) => this.#prepare(message));
    let refused: TidingsError | undefined;
    let lastError: unknown;
    for (let round = 0; pending.length > 0; round++) {
      if (round > 0) {
        if (Date.now() >= deadline || this.#link.closed) throw this.#failed(pending[0]!.message, lastError);
        await sleep(Math.min(this.#settings.reconnectMinMs * round, 1_000), this.#link.signal);
      }
      let open: OpenChannel;
      try {
        open = await this.#channel(deadline);
        await Promise.all([...new Set(pending.map((p) => p.message.envelope.topic))].map((topic) => this.#declare(open, topic)));
      } catch (error) {
        if (isRefused(error)) throw this.#refused(pending[0]!.message, error);
        lastError = error;
        continue;
      }
      const confirms: Promise<void>[] = [];
      for (const p of pending) {
        if (open.drained !== undefined) await open.drained;
        confirms.push(this.#send(open, p));
      }
      const results = await Promise.allSettled(confirms);
      const failed = pending.filter((_, index) => results[index]!.status === 'rejected');
      if (failed.length === 0) break;
      lastError = (results.find((result) => result.status === 'rejected') as PromiseRejectedResult).reason;
      const unencodable = results.find((result) => result.status === 'rejected' && result.reason instanceof TidingsError && !result.reason.retryable);
      if (unencodable !== undefined) throw (unencodable as PromiseRejectedResult).reason;
      // Over the server's max_message_size: it closed the channel; the others go again on the next one.
      const tooLarge = TOO_LARGE.exec(open.closedBy?.message ?? '');
      if (tooLarge !== null) {
        const max = Number(tooLarge[2]);
        this.#serverMaxBytes = max;
        const over = failed.filter((p) => p.encoded.body.length > max);
        refused ??= over.length > 0 ? this.#tooLarge(over[0]!.message, over[0]!.encoded.body.length, max) : undefined;
        pending = failed.filter((p) => !over.includes(p));
        continue;
      }
      pending = failed;
    }
    if (refused !== undefined) throw refused;
  }

  /** Encodes a message, or refuses it at once if RabbitMQ can never take it. */
  #prepare(message: Outgoing): Pending {
    const encoded = encode(message);
    const problem = wireProblem(message.envelope, encoded.options);
    if (problem !== undefined) throw problem;
    const max = this.#serverMaxBytes;
    if (max !== undefined && encoded.body.length > max) throw this.#tooLarge(message, encoded.body.length, max);
    return { message, encoded, exchange: this.#names.exchange(message.envelope.topic), key: routingKey(message.keyHash) };
  }

  #send(open: OpenChannel, { message, encoded, exchange, key }: Pending): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (open.closed) {
        reject(new Error('Channel closed'));
        return;
      }
      try {
        const writable = open.channel.publish(exchange, key, encoded.body, encoded.options, (error: unknown) => (error ? reject(error) : resolve()));
        // Back-pressure: the socket buffer is full; the next message waits for it to drain.
        if (!writable && open.drained === undefined) {
          open.drained = new Promise<void>((done) => {
            const finish = () => {
              open.drained = undefined;
              open.channel.off('drain', finish);
              open.channel.off('close', finish);
              done();
            };
            open.channel.once('drain', finish);
            open.channel.once('close', finish);
          });
        }
      } catch (error) {
        // The client could not encode it (nothing was sent, the channel is unharmed): that will not change.
        if (error instanceof TypeError || error instanceof RangeError) reject(this.#unencodable(message, error));
        // The channel closed under us (IllegalOperationError): this message goes again on the next one.
        else reject(error);
      }
    });
  }

  #declare(open: OpenChannel, topic: string): Promise<void> {
    let declared = open.declared.get(topic);
    if (declared === undefined) {
      declared = declareExchange(open.channel, this.#names, topic);
      open.declared.set(topic, declared);
      declared.catch(() => open.declared.delete(topic));
    }
    return declared;
  }

  #channel(deadline: number): Promise<OpenChannel> {
    if (this.#current === undefined) {
      const opening = this.#link.confirmChannel(deadline).then((channel) => {
        const open: OpenChannel = { channel, declared: new Map(), closed: false, closedBy: undefined, drained: undefined };
        channel.on('error', (error: Error) => {
          open.closedBy = error;
        });
        channel.on('close', () => {
          open.closed = true;
          if (this.#current === opening) this.#current = undefined;
        });
        return open;
      });
      this.#current = opening;
      opening.catch(() => {
        if (this.#current === opening) this.#current = undefined;
      });
    }
    return this.#current;
  }

  #failed(message: Outgoing, cause: unknown): TidingsError {
    const { id, topic, partitionkey } = message.envelope;
    return new TidingsError(
      'BACKBONE_UNAVAILABLE',
      `RabbitMQ at ${redact(this.#settings.url)} did not confirm message ${id} on ${topic} within ${this.#settings.publishTimeoutMs} ms${
        cause instanceof Error ? ` (${cause.message})` : ''
      }; publish it again with the same id (it may already have arrived once: inboxes de-duplicate by id)`,
      { retryable: true, cause, ref: { id, topic, key: partitionkey } },
    );
  }

  #tooLarge(message: Outgoing, bytes: number, max: number): TidingsError {
    const { id, topic, partitionkey } = message.envelope;
    return new TidingsError(
      'LIMIT_EXCEEDED',
      `Message ${id} on ${topic} cannot go to RabbitMQ: it is ${bytes} bytes, over the server's limit of ${max} (max_message_size); store large data elsewhere and publish a reference to it`,
      { ref: { id, topic, key: partitionkey } },
    );
  }

  #unencodable(message: Outgoing, cause: Error): TidingsError {
    const { id, topic, partitionkey } = message.envelope;
    return new TidingsError('INVALID_PAYLOAD', `Message ${storable(String(id), 300)} on ${topic} cannot be encoded for RabbitMQ: ${cause.message}`, {
      cause,
      ref: { id: storable(String(id), 300), topic, key: storable(String(partitionkey), 300) },
    });
  }

  #refused(message: Outgoing, cause: unknown): TidingsError {
    const { id, topic, partitionkey } = message.envelope;
    return new TidingsError(
      'PUBLISH_FAILED',
      `RabbitMQ refused the exchange ${this.#names.exchange(topic)} for message ${id}: ${(cause as Error).message}; an exchange of that name exists with other settings (Tidings needs a durable topic exchange): remove it or change the prefix`,
      { cause, ref: { id, topic, key: partitionkey } },
    );
  }

  async close(): Promise<void> {
    const current = this.#current;
    this.#current = undefined;
    if (current === undefined) return;
    const open = await current.catch(() => undefined);
    if (open !== undefined && !open.closed) await open.channel.close().catch(() => undefined);
  }
}

/** A declaration the server refused (406 PRECONDITION_FAILED, 403 ACCESS_REFUSED): retrying cannot help. */
function isRefused(error: unknown): boolean {
  const code = (error as { code?: unknown })?.code;
  return code === 406 || code === 403;
}
