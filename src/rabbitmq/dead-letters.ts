/**
 * Dead letters kept in RabbitMQ: one queue per subscription (`<prefix><subscription>:dead`), listed in
 * `<prefix>dead-letter-queues` so that tools find them without the management plugin.
 *
 * Reading is `basic.get` without acknowledgement on a channel of its own: every message of the queue is
 * taken out, inspected, and the ones not chosen go back when the channel closes (RabbitMQ has no way to
 * peek). Removing one is acknowledging it. While a scan runs, its messages are invisible to another scan,
 * so two operators at once each see part of the queue: the result counts what each really did.
 *
 * Redrive hands the message back to its subscription only (through the subscription's return exchange, to
 * its partition queue), with its id, attempts reset and history cleared, then acknowledges the dead letter.
 * Republishing to the topic exchange would hand it to every subscription of the topic again.
 */
import type { Channel, ConfirmChannel, GetMessage } from 'amqplib';
import type { AttemptRecord } from '../core/backbone.ts';
import type {
  DeadLetter,
  DeadLetterActionRequest,
  DeadLetterActionResult,
  DeadLetterSelection,
  DeadLetterStore,
  DeadLetterSummary,
} from '../core/dead-letters.ts';
import { requireSelection } from '../core/dead-letters.ts';
import type { Envelope } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import {
  cleanHeaders,
  copyOptions,
  decode,
  H_ATTEMPTS,
  H_DEAD_AT,
  H_DEAD_ID,
  H_DEAD_REASON,
  H_HISTORY,
  H_PARTITION,
  H_QUEUE,
  H_SUBSCRIPTION,
  historyOf,
} from './codec.ts';
import type { Link } from './connection.ts';
import type { Names } from './topology.ts';

interface DeadLetterSettings {
  readonly quorum: boolean;
  /** Dead letters read per queue at most by one operation. */
  readonly scanLimit: number;
  readonly listLimit: number;
  readonly connectTimeoutMs: number;
}

interface Scanned {
  readonly letter: DeadLetter;
  readonly message: GetMessage;
  readonly partition: number;
}

export class RabbitDeadLetters implements DeadLetterStore {
  readonly #link: Link;
  readonly #names: Names;
  readonly #settings: DeadLetterSettings;

  constructor(link: Link, names: Names, settings: DeadLetterSettings) {
    this.#link = link;
    this.#names = names;
    this.#settings = settings;
  }

  /** Records that `subscription` has a dead-letter queue (once; duplicates are harmless). */
  async register(subscription: string): Promise<void> {
    const known = await this.subscriptions();
    if (known.includes(subscription)) return;
    const channel = await this.#link.confirmChannel(this.#deadline());
    try {
      await this.#declareRegistry(channel);
      await new Promise<void>((resolve, reject) => {
        channel.sendToQueue(this.#names.registry, Buffer.from(subscription), { persistent: true, contentType: 'text/plain' }, (error: unknown) =>
          error ? reject(error) : resolve(),
        );
      });
    } finally {
      await channel.close().catch(() => undefined);
    }
  }

  /** Subscriptions that have a dead-letter queue. */
  async subscriptions(): Promise<string[]> {
    const channel = await this.#link.confirmChannel(this.#deadline());
    try {
      await this.#declareRegistry(channel);
      const names = new Set<string>();
      for (;;) {
        const message = await channel.get(this.#names.registry, { noAck: false });
        if (message === false) break;
        names.add(message.content.toString('utf8'));
      }
      return [...names].sort();
    } finally {
      // Closing returns every entry to the registry.
      await channel.close().catch(() => undefined);
    }
  }

  async list(selection: DeadLetterSelection & { readonly limit?: number | undefined }): Promise<{ total: number; deadLetters: DeadLetterSummary[] }> {
    const found = await this.#read(selection);
    const limit = selection.limit ?? this.#settings.listLimit;
    return {
      total: found.length,
      deadLetters: found.slice(0, limit).map(({ attempts, envelope: _envelope, ...rest }) => ({ ...rest, attempts: attempts.length })),
    };
  }

  async show(id: string): Promise<DeadLetter[]> {
    return this.#read({ ids: [id] });
  }

  async count(selection: DeadLetterSelection): Promise<number> {
    return (await this.#read(selection)).length;
  }

  redrive(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return this.#act(request, 'redrive');
  }

  drop(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return this.#act(request, 'drop');
  }

  async #read(selection: DeadLetterSelection): Promise<DeadLetter[]> {
    const found: DeadLetter[] = [];
    for (const subscription of await this.#chosenSubscriptions(selection)) {
      const channel = await this.#link.confirmChannel(this.#deadline());
      try {
        for (const scanned of await this.#scan(channel, subscription)) if (matches(scanned.letter, selection)) found.push(scanned.letter);
      } finally {
        await channel.close().catch(() => undefined);
      }
    }
    return found.sort((a, b) => a.deadAt.localeCompare(b.deadAt) || a.id.localeCompare(b.id));
  }

  async #act(request: DeadLetterActionRequest, action: 'redrive' | 'drop'): Promise<DeadLetterActionResult> {
    requireSelection(request);
    const result = { matched: 0, count: 0, bySubscription: {} as Record<string, number>, messageIds: [] as string[], stopped: false };
    const subscriptions = await this.#chosenSubscriptions(request);
    const started = Date.now();
    for (const subscription of subscriptions) {
      const channel = await this.#link.confirmChannel(this.#deadline());
      try {
        const chosen = (await this.#scan(channel, subscription)).filter((scanned) => matches(scanned.letter, request));
        result.matched += chosen.length;
        if (action === 'redrive' && chosen.length > 0) await this.#declareTarget(channel, subscription, chosen);
        for (const scanned of chosen) {
          if (request.signal?.aborted) {
            result.stopped = true;
            break;
          }
          if (request.ratePerSecond !== undefined && request.ratePerSecond > 0) {
            const due = started + (result.count / request.ratePerSecond) * 1_000;
            if (due > Date.now()) await new Promise((resolve) => setTimeout(resolve, due - Date.now()));
          }
          if (action === 'redrive') await this.#sendBack(channel, subscription, scanned);
          channel.ack(scanned.message);
          result.count++;
          result.bySubscription[subscription] = (result.bySubscription[subscription] ?? 0) + 1;
          result.messageIds.push(scanned.letter.messageId);
          request.onProgress?.({ done: result.count, total: result.matched });
        }
      } finally {
        // Acknowledgements are sent in order before the close; the rest go back to the queue.
        await channel.close().catch(() => undefined);
      }
      if (result.stopped) break;
    }
    return result;
  }

  /** The return exchange is declared when the subscription starts; without it the message would be dropped. */
  async #declareTarget(channel: ConfirmChannel, subscription: string, chosen: readonly Scanned[]): Promise<void> {
    try {
      await channel.checkExchange(this.#names.returnExchange(subscription));
    } catch (error) {
      throw new TidingsError(
        'SUBSCRIPTION_CONFLICT',
        `Dead letters of subscription ${subscription} cannot be redriven: its return exchange ${this.#names.returnExchange(subscription)} does not exist (${(error as Error).message}); start a bus with that subscription first`,
        { cause: error, ref: { id: chosen[0]!.letter.messageId } },
      );
    }
  }

  async #sendBack(channel: ConfirmChannel, subscription: string, scanned: Scanned): Promise<void> {
    // Each scan returned the dead letter to its queue, which counted a delivery: the copy starts afresh.
    const headers = cleanHeaders(scanned.message.properties.headers);
    for (const name of [H_DEAD_ID, H_DEAD_REASON, H_DEAD_AT, H_SUBSCRIPTION, H_QUEUE, H_HISTORY]) delete headers[name];
    headers[H_ATTEMPTS] = 0;
    headers[H_PARTITION] = String(scanned.partition);
    await new Promise<void>((resolve, reject) => {
      channel.publish(this.#names.returnExchange(subscription), '', scanned.message.content, copyOptions(scanned.message, headers), (error: unknown) =>
        error ? reject(error) : resolve(),
      );
    });
  }

  /** Takes every dead letter of the subscription out of its queue, unacknowledged, on `channel`. */
  async #scan(channel: Channel, subscription: string): Promise<Scanned[]> {
    const queue = this.#names.deadQueue(subscription);
    try {
      await channel.checkQueue(queue);
    } catch {
      // Registered but gone (deleted by hand): nothing to read. The channel is closed by the failed check.
      return [];
    }
    const scanned: Scanned[] = [];
    while (scanned.length < this.#settings.scanLimit) {
      const message = await channel.get(queue, { noAck: false });
      if (message === false) break;
      scanned.push(toScanned(subscription, message));
    }
    return scanned;
  }

  async #chosenSubscriptions(selection: DeadLetterSelection): Promise<string[]> {
    const all = await this.subscriptions();
    return selection.subscription === undefined ? all : all.filter((name) => name === selection.subscription);
  }

  async #declareRegistry(channel: Channel): Promise<void> {
    await channel.assertQueue(this.#names.registry, { durable: true, arguments: { 'x-queue-type': 'classic' } });
  }

  #deadline(): number {
    return Date.now() + this.#settings.connectTimeoutMs;
  }
}

function toScanned(subscription: string, message: GetMessage): Scanned {
  const headers = message.properties.headers ?? {};
  const text = (name: string): string | undefined => {
    const value = headers[name] as unknown;
    return typeof value === 'string' ? value : Buffer.isBuffer(value) ? value.toString('utf8') : undefined;
  };
  const decoded = decode(message, undefined);
  const history: AttemptRecord[] = historyOf(headers);
  const fallbackId = typeof message.properties.messageId === 'string' ? message.properties.messageId : `(no id) ${message.fields.deliveryTag}`;
  const envelope: Envelope = decoded.ok
    ? decoded.value.envelope
    : {
        specversion: '1.0',
        id: decoded.id ?? fallbackId,
        source: '',
        type: '',
        time: text(H_DEAD_AT) ?? new Date().toISOString(),
        datacontenttype: 'application/json',
        topic: '',
        partitionkey: '',
        correlationid: '',
        data: message.content.toString('utf8'),
      };
  const letter: DeadLetter = {
    id: text(H_DEAD_ID) ?? `${subscription}:${envelope.id}`,
    subscription,
    messageId: envelope.id,
    topic: envelope.topic,
    key: envelope.partitionkey,
    position: null,
    reason: text(H_DEAD_REASON) ?? '(no reason recorded)',
    deadAt: text(H_DEAD_AT) ?? '',
    envelope,
    attempts: history,
  };
  const partition = Number(text(H_PARTITION) ?? headers[H_PARTITION] ?? 0);
  return { letter, message, partition: Number.isInteger(partition) ? partition : 0 };
}

function matches(letter: DeadLetter, selection: DeadLetterSelection): boolean {
  if ((selection.ids?.length ?? 0) > 0 && !selection.ids!.some((id) => id === letter.id || id === letter.messageId)) return false;
  if (selection.subscription !== undefined && selection.subscription !== letter.subscription) return false;
  if (selection.topic !== undefined && selection.topic !== letter.topic) return false;
  if (selection.errorText !== undefined) {
    const needle = selection.errorText.toLowerCase();
    const inReason = letter.reason.toLowerCase().includes(needle);
    if (!inReason && !letter.attempts.some((attempt) => attempt.error.message.toLowerCase().includes(needle))) return false;
  }
  return true;
}
