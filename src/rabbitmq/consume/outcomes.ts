/**
 * What becomes of a lane's head: handled through core's attempt loop (core/attempts.ts) and acknowledged,
 * sent to a delay queue for a delayed retry (its hold recorded first), or dead-lettered with its history;
 * a message of a topic no longer the subscription's is skipped or refused.
 *
 * Attempts. `attempt` = attempts recorded in the x-tidings-attempts header (retries through delay queues)
 * + returns counted by the queue (x-delivery-count on quorum queues; classic queues only say "redelivered"),
 * less those a reader made as it let go of the partition without having started the message (holds.ts)
 * + 1. Immediate retries (delay 0) run again in place, without a round trip. Each failed attempt's error
 * travels in x-tidings-history, so a dead letter carries the whole history.
 */
import type { ConfirmChannel, ConsumeMessage, MessagePropertyHeaders } from 'amqplib';
import { runAttempts, type AttemptScope } from '../../core/attempts.ts';
import type { AttemptRecord } from '../../core/backbone.ts';
import { newId, type Envelope } from '../../core/envelope.ts';
import { describeError, TidingsError } from '../../core/errors.ts';
import {
  attemptsOf,
  attributeHeaders,
  cleanHeaders,
  copyOptions,
  fitHeaders,
  H_ATTEMPTS,
  H_DEAD_AT,
  H_DEAD_ID,
  H_DEAD_REASON,
  H_HISTORY,
  H_PARTITION,
  H_QUEUE,
  H_SUBSCRIPTION,
  historyHeader,
  returnsOf,
} from '../codec.ts';
import { holdMessage } from './holds.ts';
import { declareRetryQueue, retryLevel } from '../topology.ts';
import type { HoldsQueue } from './holds-queue.ts';
import { ackEntry, channelOf, sendConfirmed, type Entry, type ReaderState } from './state.ts';

/** A broker has no transaction of its own: the outbox, if any, gives the handler one (src/outbox). */
const NO_TRANSACTION: AttemptScope<undefined> = { tx: undefined, end: async () => undefined };

/** How a head ended: finished (its lane moves on), or away in a delay queue, its place kept. */
export type Settled = 'done' | 'away';

/** A message that could not be decoded, as it came: dead-lettered with the reason. */
interface Undecodable {
  readonly message: ConsumeMessage;
  readonly generation: number;
  readonly reason: string;
  readonly history: readonly AttemptRecord[];
}

/** A dead letter's facts besides the message. */
interface DeadFacts {
  readonly reason: string;
  readonly history: readonly AttemptRecord[];
  readonly attempt: number;
  readonly envelope?: Envelope | undefined;
}

export class Outcomes {
  readonly #state: ReaderState;
  readonly #holds: HoldsQueue;
  readonly #retryQueues = new Map<number, Promise<string>>();

  constructor(state: ReaderState, holds: HoldsQueue) {
    this.#state = state;
    this.#holds = holds;
  }

  /** The channel is gone: its delay queues are declared again on the next. */
  reset(): void {
    this.#retryQueues.clear();
  }

  async handle(entry: Entry): Promise<Settled> {
    const decoded = entry.decoded!;
    const { host } = this.#state;
    const { recent, spec } = host;
    if (spec.inbox && recent.has(entry.id)) {
      try {
        ackEntry(this.#state, entry);
      } catch {
        // The channel is gone: the duplicate comes again and is dropped again.
      }
      return 'done';
    }
    try {
      const result = await runAttempts(host.handle, {
        first: this.#attemptOf(entry),
        history: [...decoded.history],
        retry: spec.retry,
        envelope: () => decoded.envelope,
        open: () => NO_TRANSACTION,
        // Letting go of the partition: a failed attempt waits in a delay queue for the next reader.
        stopping: () => this.#state.phase !== 'reading',
      });
      if (result.kind === 'ack') {
        ackEntry(this.#state, entry);
        if (spec.inbox) recent.add(entry.id);
      } else if (result.kind === 'dead') {
        await this.#deadLetter(entry, { reason: result.reason, history: result.history, attempt: result.history.at(-1)?.attempt ?? this.#attemptOf(entry) });
      } else {
        await this.sendToDelay(entry, result.delayMs, { [H_ATTEMPTS]: result.attempt, [H_HISTORY]: historyHeader(result.history) });
        return 'away';
      }
    } catch (error) {
      // The channel went away while the outcome was being recorded: the broker redelivers the message.
      if (this.#state.phase !== 'releasing')
        host.settings.warn(`Subscription ${spec.name} could not record the outcome of message ${entry.id}; it will be delivered again`, error);
    }
    return 'done';
  }

  /** A message of a topic that is no longer the subscription's, come through a binding left behind: acknowledged. */
  async skip(entry: Entry): Promise<Settled> {
    try {
      ackEntry(this.#state, entry);
    } catch {
      // The channel is gone: it comes again and is skipped again.
    }
    return 'done';
  }

  /** A message of a topic no worker has a handler for, not come from its exchange: a dead letter, with the reason. */
  async refuse(entry: Entry, reason: string): Promise<Settled> {
    const { host } = this.#state;
    const decoded = entry.decoded!;
    const attempt = this.#attemptOf(entry);
    const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, { ref: { id: entry.id, topic: decoded.envelope.topic, key: entry.key } }));
    try {
      await this.#deadLetter(entry, { reason, history: [...decoded.history, { attempt, at: new Date().toISOString(), error }], attempt });
      host.settings.warn(`Subscription ${host.spec.name}: ${reason}; moved to ${host.names.deadQueue(host.spec.name)}`);
    } catch (failure) {
      if (this.#state.phase !== 'releasing')
        host.settings.warn(`Subscription ${host.spec.name} could not dead-letter message ${entry.id}; it will be delivered again`, failure);
    }
    return 'done';
  }

  /** The attempt a delivery is: attempts before it went through a delay queue, returns that were attempts, this one. */
  #attemptOf(entry: Entry): number {
    return entry.decoded!.priorAttempts + Math.max(returnsOf(entry.message!) - entry.unstarted, 0) + 1;
  }

  /**
   * Sends the message to the delay queue for `delayMs` and records the hold, then acknowledges the message;
   * its place in the lane stays.
   */
  async sendToDelay(entry: Entry, delayMs: number, extra: MessagePropertyHeaders): Promise<void> {
    const { host, index, holdsQueue } = this.#state;
    const channel = channelOf(this.#state, entry);
    const level = retryLevel(delayMs, host.settings.retryMinMs);
    const queue = await this.#retryQueue(channel, level);
    const { message, decoded, generation, state } = entry;
    // What the first delivery derived (a topic from the exchange, a time from now...) travels with the copy.
    const original = cleanHeaders(message!.properties.headers);
    const headers = fitHeaders({ ...original, ...attributeHeaders(decoded!.envelope, original), ...extra, [H_PARTITION]: String(index) });
    // Away before the publish: the copy may come back (a short delay) before the confirm does.
    entry.state = 'away';
    entry.message = undefined;
    entry.decoded = undefined;
    entry.dueAt = Date.now() + level;
    entry.giveUpAt = entry.dueAt + host.settings.retryReturnGraceMs;
    const hold = holdMessage({ key: entry.key, id: entry.id, dueAt: entry.dueAt, seq: entry.seq });
    try {
      await this.#holds.read(channel, generation);
      await Promise.all([
        sendConfirmed(channel, holdsQueue, hold.body, hold.options),
        sendConfirmed(channel, queue, message!.content, copyOptions(message!, headers)),
      ]);
    } catch (error) {
      Object.assign(entry, { state, message, decoded });
      throw error;
    }
    ackEntry(this.#state, entry, { message: message!, generation });
  }

  #retryQueue(channel: ConfirmChannel, level: number): Promise<string> {
    let queue = this.#retryQueues.get(level);
    if (queue === undefined) {
      const { host } = this.#state;
      queue = declareRetryQueue(channel, host.names, host.settings, host.spec.name, level);
      this.#retryQueues.set(level, queue);
      queue.catch(() => this.#retryQueues.delete(level));
    }
    return queue;
  }

  async #deadLetter(entry: Entry, facts: Omit<DeadFacts, 'envelope'>): Promise<void> {
    const { host } = this.#state;
    const channel = channelOf(this.#state, entry);
    const message = entry.message!;
    const headers = this.#deadHeaders(message, { ...facts, envelope: entry.decoded!.envelope });
    await sendConfirmed(channel, host.names.deadQueue(host.spec.name), message.content, copyOptions(message, headers));
    ackEntry(this.#state, entry);
  }

  /** A message that cannot be decoded goes to dead letters as it came (body and headers), with the reason. */
  async deadLetterRaw({ message, generation, reason, history }: Undecodable): Promise<void> {
    const state = this.#state;
    const { names, settings, spec } = state.host;
    try {
      const channel = state.channel;
      if (channel === undefined || generation !== state.generation) return;
      const headers = this.#deadHeaders(message, { reason, history, attempt: attemptsOf(message.properties.headers ?? {}) + 1 });
      await sendConfirmed(channel, names.deadQueue(spec.name), message.content, copyOptions(message, headers));
      if (generation === state.generation) state.acks?.ack(message);
      settings.warn(`Subscription ${spec.name}: ${reason}; moved to ${names.deadQueue(spec.name)}`);
    } catch (error) {
      if (state.phase !== 'releasing')
        settings.warn(`Subscription ${spec.name} could not dead-letter an undecodable message; it will be delivered again`, error);
    }
  }

  /** The dead letter's headers: the message's, what its delivery derived, the dead-letter facts; cut to fit. */
  #deadHeaders(message: ConsumeMessage, { reason, history, attempt, envelope }: DeadFacts): MessagePropertyHeaders {
    const { host, queue, index } = this.#state;
    const original = cleanHeaders(message.properties.headers);
    return fitHeaders({
      ...original,
      ...(envelope === undefined ? {} : attributeHeaders(envelope, original)),
      [H_DEAD_ID]: newId(),
      [H_DEAD_REASON]: reason.slice(0, 4_000),
      [H_DEAD_AT]: new Date().toISOString(),
      [H_SUBSCRIPTION]: host.spec.name,
      [H_QUEUE]: queue,
      [H_PARTITION]: String(index),
      [H_ATTEMPTS]: attempt,
      [H_HISTORY]: historyHeader(history),
    });
  }
}
