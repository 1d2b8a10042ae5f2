/**
 * `bus.request`: send a command that answers and wait for its reply, which the backbone carries back
 * (Backbone.reply, awaitReply), under a timeout on the bus's clock. Counts what it sent and how each ended.
 */
import type { Backbone } from './backbone.ts';
import type { Clock, ClockTimer } from './clock.ts';
import { validateReplyNow, type AnyRequestContract, type InputOf, type ReplyOf } from './contract.ts';
import { newId } from './envelope.ts';
import { TidingsError, type TidingsErrorCode } from './errors.ts';
import { busDefaults } from './options.ts';
import type { PublishedMessage, PublishOptions, RequestOptions } from './publish.ts';
import { handlerScope } from './scope.ts';

/** What the requester needs of its bus. */
interface RequesterSettings {
  readonly backbone: Backbone<unknown>;
  readonly clock: Clock;
  readonly open: () => Promise<void>;
  /** `bus.send`: the request is a command like any other. */
  readonly send: (contract: AnyRequestContract, data: unknown, options: PublishOptions) => Promise<PublishedMessage>;
}

export interface RequestStats {
  sent: number;
  answered: number;
  timedOut: number;
  /** Replies that came after their request's timeout (dropped). */
  late: number;
}

export class Requester {
  readonly counts: RequestStats = { sent: 0, answered: 0, timedOut: 0, late: 0 };
  readonly #settings: RequesterSettings;

  constructor(settings: RequesterSettings) {
    this.#settings = settings;
  }

  async request<C extends AnyRequestContract>(contract: C, data: InputOf<C>, options: RequestOptions): Promise<ReplyOf<C>> {
    const { backbone, clock } = this.#settings;
    if (handlerScope.getStore() !== undefined) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `bus.request(${contract.name}) inside a handler would hold the handler's key until the reply comes: publish the command and handle the answer as a message, or use a saga`,
      );
    }
    if (contract.kind !== 'command' || contract.reply === undefined) {
      throw new TidingsError('INVALID_CONTRACT', `${contract.name} declares no reply: declare it with defineCommand(name, { schema, reply }) to request it`);
    }
    const { timeoutMs = busDefaults.requestTimeoutMs, ...publish } = options;
    if (!Number.isFinite(timeoutMs) || timeoutMs <= 0)
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Invalid options for requesting ${contract.name}: timeoutMs must be a number of milliseconds > 0, got ${timeoutMs}`,
      );
    const awaitReply = backbone.awaitReply?.bind(backbone);
    if (awaitReply === undefined) throw new TidingsError('INVALID_OPTIONS', `The ${backbone.name} backbone cannot carry replies`);
    await this.#settings.open();
    const id = publish.id ?? newId();
    const waiting = new AbortController();
    // Waiting before sending: the reply may come before send resolves.
    const answer = awaitReply(id, waiting.signal, () => this.counts.late++);
    answer.catch(() => undefined);
    this.counts.sent++;
    let timer: ClockTimer | undefined;
    try {
      await this.#settings.send(contract, data, { ...publish, id });
      const timeout = new Promise<never>((_, reject) => {
        timer = clock.setTimeout(() => {
          this.counts.timedOut++;
          reject(
            new TidingsError(
              'REQUEST_TIMEOUT',
              `Request ${contract.name} (message ${id}) got no reply within ${timeoutMs} ms: is a subscription of ${contract.topic} running (tidings status)?`,
              { ref: { id, topic: contract.topic }, retryable: true },
            ),
          );
        }, timeoutMs);
      });
      const reply = await Promise.race([answer, timeout]);
      if (reply.error !== undefined) {
        const code = PASSED_ON.find((known) => known === reply.error!.code) ?? 'REQUEST_FAILED';
        throw new TidingsError(code, `Request ${contract.name} (message ${id}) failed: ${reply.error.message}`, { ref: { id, topic: contract.topic } });
      }
      const checked = validateReplyNow(contract, reply.data, { id, topic: contract.topic });
      this.counts.answered++;
      return (checked instanceof Promise ? await checked : checked) as ReplyOf<C>;
    } finally {
      clock.clearTimeout(timer);
      waiting.abort();
    }
  }
}

/** The codes of a request's remote error that a requester can act on as they are; any other is REQUEST_FAILED. */
const PASSED_ON: readonly TidingsErrorCode[] = ['INVALID_PAYLOAD', 'LIMIT_EXCEEDED', 'PAYLOAD_TOO_LARGE', 'UNDECODABLE_MESSAGE', 'HANDLER_TIMEOUT'];
