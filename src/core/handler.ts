import type { Delivery, DeliveryHandler, DeliveryResult } from './backbone.ts';
import { upcastData, validateNow, validateReplyNow, type AnyContract, type DataOf, type InputOf } from './contract.ts';
import { toMessage, type Envelope, type Message } from './envelope.ts';
import { describeError, HandlerTimeoutError, isPermanent, storable, TidingsError, type MessageRef } from './errors.ts';
import { envelopeProblem } from './limits.ts';
import type { ResolvedRetry } from './options.ts';
import { exhausted, nextRetryDelay } from './retry.ts';
import { receivedTenantProblem } from './tenant.ts';
import type { PublishOptions, PublishedMessage } from './publish.ts';
import { handlerScope } from './scope.ts';

/** What a handler may return instead of throwing: ask for a later retry, or give up on the message. */
export type Outcome = { readonly kind: 'retry'; readonly afterMs: number; readonly reason: string } | { readonly kind: 'dead-letter'; readonly reason: string };

/** Try this message again after `afterMs` (counts as a failed attempt; the key is held meanwhile). */
/** Outcomes made by retryLater and deadLetter: a request's handler returns its reply or one of these. */
const outcomes = new WeakSet<object>();

function outcome(value: Outcome): Outcome {
  outcomes.add(value);
  return value;
}

export function retryLater(afterMs: number, reason = 'handler asked to retry later'): Outcome {
  return outcome({ kind: 'retry', afterMs, reason });
}

/** Send this message to dead letters now: nothing retrying could change would help. */
export function deadLetter(reason: string): Outcome {
  return outcome({ kind: 'dead-letter', reason });
}

export interface HandlerContext<Tx = unknown> {
  readonly subscription: string;
  /** 1 on the first attempt. */
  readonly attempt: number;
  /**
   * A transaction that commits together with this message's acknowledgement, so writes made through it
   * happen exactly once. Throws if the backbone has no transaction to offer.
   */
  readonly tx: Tx;
  /** Aborted when the handler times out or the consumer stops. */
  readonly signal: AbortSignal;
  /** Publishes in this handler's transaction, inheriting correlation id, causation id and tenant. */
  publish<C extends AnyContract>(contract: C, data: InputOf<C>, options?: PublishOptions): Promise<PublishedMessage>;
}

export type Handler<Data, Tx = unknown> = (message: Message<Data>, context: HandlerContext<Tx>) => Promise<Outcome | void> | Outcome | void;

/**
 * The handler of a command that answers (RequestContract): returns the reply, which commits with the
 * message's acknowledgement and reaches the `bus.request` waiting for it, or an Outcome (retryLater,
 * deadLetter) like any handler; a request that ends in dead letters answers with its error.
 */
export type ReplyHandler<Data, Reply, Tx = unknown> = (message: Message<Data>, context: HandlerContext<Tx>) => Promise<Reply | Outcome> | Reply | Outcome;

/** Wraps every handler of a bus; call `next()` to go on. Tracing, tenancy and logging are middleware. */
export type Middleware<Tx = unknown> = (message: Message<unknown>, context: HandlerContext<Tx>, next: () => Promise<Outcome | void>) => Promise<Outcome | void>;

export interface Route<Tx> {
  readonly contract: AnyContract;
  readonly handler: Handler<unknown, Tx>;
}

interface PipelineOptions<Tx> {
  readonly subscription: string;
  readonly routes: ReadonlyMap<string, Route<Tx>>;
  readonly retry: ResolvedRetry;
  readonly timeoutMs: number;
  /** Dead-letter a message without a tenant instead of handling it. */
  readonly requireTenant?: boolean;
  /** Handlers may publish for other tenants than their message's. */
  readonly crossTenant?: boolean;
  readonly middleware: readonly Middleware<Tx>[];
  readonly publish: (contract: AnyContract, data: unknown, options: PublishOptions, parent: Message<unknown>, tx: Tx | undefined) => Promise<PublishedMessage>;
  /** Aborted when the consumer stops: handlers see it through `context.signal`. */
  readonly stopping: AbortSignal;
  /** Records a request's reply in the handler's transaction, so it exists iff the message is acknowledged. */
  readonly reply: (request: Message<unknown>, reply: unknown, tx: Tx | undefined) => Promise<void>;
}

/**
 * Builds the function a backbone calls for each delivery: route by topic, validate, run middleware and
 * the handler under a timeout, and turn what happened into ack, retry (with the policy's delay) or dead letter.
 */
export function createPipeline<Tx>(options: PipelineOptions<Tx>): DeliveryHandler<Tx> {
  const deadlines = options.timeoutMs > 0 ? new Deadlines(options.timeoutMs) : undefined;
  return async (delivery: Delivery<Tx>): Promise<DeliveryResult> => {
    const { envelope, attempt } = delivery;
    const ref = { id: envelope.id, topic: envelope.topic, key: envelope.partitionkey };
    const broken = checkEnvelope(envelope);
    if (broken !== undefined)
      return refuse('UNDECODABLE_MESSAGE', `Message ${storable(String(envelope.id), 300)} on ${envelope.topic} cannot be decoded: ${broken}`, ref);
    const over = envelopeProblem(envelope);
    if (over !== undefined) return refuse('LIMIT_EXCEEDED', `Message on ${envelope.topic} breaks a limit: ${over}`, ref);
    const route = options.routes.get(envelope.topic);
    if (route === undefined) return refuse('UNDECODABLE_MESSAGE', `Subscription ${options.subscription} has no handler for topic ${envelope.topic}`, ref);
    const tenancy = receivedTenantProblem(envelope.tenant, options.subscription, options.requireTenant === true);
    if (tenancy !== undefined)
      return refuse(envelope.tenant === undefined ? 'TENANT_REQUIRED' : 'INVALID_TENANT', `Message on ${envelope.topic}: ${tenancy}`, ref);
    const version = versionOf(envelope.type, envelope.topic);
    if (version !== undefined && version > route.contract.version) {
      return refuse(
        'UNDECODABLE_MESSAGE',
        `Subscription ${options.subscription} has no handler for version ${version} of ${envelope.topic} (it reads version ${route.contract.version}): deploy a handler that reads it, then redrive`,
        ref,
      );
    }
    let data: DataOf<AnyContract>;
    try {
      const validated = validateNow(route.contract, upcastData(route.contract, version, envelope.data, ref), ref);
      data = validated instanceof Promise ? await validated : validated;
    } catch (error) {
      return { outcome: 'dead-letter', reason: unreadable(error, route.contract, version), error: describeError(error) };
    }
    const message = toMessage(envelope, data);
    const abort = new LazyAbort(options.stopping);
    const context = new DeliveryContext(options, delivery, message, abort);
    try {
      const outcome = await handlerScope.run({ message, delivery, crossTenant: options.crossTenant === true }, () => {
        const work = runChain(options.middleware, route.handler, message, context);
        if (deadlines === undefined) return work;
        return deadlines.race(work, () => {
          const error = new HandlerTimeoutError(options.timeoutMs, ref);
          abort.abort(error);
          return error;
        });
      });
      if (route.contract.reply !== undefined && !(typeof outcome === 'object' && outcome !== null && outcomes.has(outcome))) {
        return await answer(options, route.contract, message, outcome, delivery.tx);
      }
      if (outcome === undefined || outcome === null) return ACK;
      const reason = storable(String(outcome.reason));
      const error = { name: 'Outcome', message: reason };
      if (outcome.kind === 'dead-letter') return { outcome: 'dead-letter', reason, error };
      const delay = nextRetryDelay(options.retry, attempt);
      if (delay === undefined) return exhausted(attempt, error);
      return { outcome: 'retry', delayMs: Math.max(outcome.afterMs, 0), error };
    } catch (error) {
      const record = describeError(error);
      // Ended by bus.stop() through its signal: the next worker tries again, whatever the policy has left.
      if (abort.interrupted) return { outcome: 'retry', delayMs: 0, error: record };
      if (isPermanent(error)) return { outcome: 'dead-letter', reason: `permanent error: ${record.message}`, error: record };
      const delay = nextRetryDelay(options.retry, attempt);
      if (delay === undefined) return exhausted(attempt, record);
      return { outcome: 'retry', delayMs: delay, error: record };
    } finally {
      abort.dispose();
    }
  };
}

const ACK: DeliveryResult = Object.freeze({ outcome: 'ack' });

/**
 * A request's handler returned its reply: checked against the contract's reply schema, then recorded in the
 * handler's transaction. A reply that breaks its schema is the handler's bug: the request goes to dead
 * letters, and the requester gets the error (INVALID_PAYLOAD).
 */
async function answer<Tx>(
  options: PipelineOptions<Tx>,
  contract: AnyContract,
  request: Message<unknown>,
  reply: unknown,
  tx: Tx | undefined,
): Promise<DeliveryResult> {
  try {
    const checked = validateReplyNow(contract, reply, { id: request.id, topic: request.topic, key: request.key });
    if (checked instanceof Promise) await checked;
  } catch (error) {
    return { outcome: 'dead-letter', reason: `the handler's reply is invalid: ${(error as Error).message}`, error: describeError(error) };
  }
  await options.reply(request, reply, tx);
  return ACK;
}

/** A handler's `context`: a class, so its getters are shared, not made again for every message. */
class DeliveryContext<Tx> implements HandlerContext<Tx> {
  readonly subscription: string;
  readonly attempt: number;

  constructor(
    private readonly options: PipelineOptions<Tx>,
    private readonly delivery: Delivery<Tx>,
    private readonly message: Message<unknown>,
    private readonly abort: LazyAbort,
  ) {
    this.subscription = options.subscription;
    this.attempt = delivery.attempt;
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  get tx(): Tx {
    if (this.delivery.tx === undefined) {
      throw new TidingsError('NO_TRANSACTION', 'This backbone offers no transaction to handlers (context.tx): give a broker backbone an outbox database');
    }
    return this.delivery.tx;
  }

  /** A getter, so that `const { publish } = ctx` works too; the function is made only when read. */
  get publish(): HandlerContext<Tx>['publish'] {
    return (contract, data, options = {}) => this.options.publish(contract, data, options, this.message, this.delivery.tx);
  }
}

/**
 * A handler's `signal`, made only when the handler reads it: most never do, and an AbortController with a
 * listener on the consumer's stop signal costs about as much as the rest of a delivery.
 */
class LazyAbort {
  #controller: AbortController | undefined;
  #onStop: (() => void) | undefined;
  #aborted = false;
  #reason: unknown;

  constructor(private readonly stopping: AbortSignal) {}

  get signal(): AbortSignal {
    if (this.#controller === undefined) {
      this.#controller = new AbortController();
      if (this.#aborted) this.#controller.abort(this.#reason);
      else if (this.stopping.aborted) this.#controller.abort(this.stopping.reason);
      else {
        this.#onStop = () => this.#controller?.abort(this.stopping.reason);
        this.stopping.addEventListener('abort', this.#onStop, { once: true });
      }
    }
    return this.#controller.signal;
  }

  /** The handler read its signal, and the bus's stop (not the timeout) aborted it. */
  get interrupted(): boolean {
    return this.#controller !== undefined && !this.#aborted && this.stopping.aborted;
  }

  abort(reason: unknown): void {
    this.#aborted = true;
    this.#reason = reason;
    this.#controller?.abort(reason);
  }

  dispose(): void {
    if (this.#onStop !== undefined) this.stopping.removeEventListener('abort', this.#onStop);
  }
}

/** The message's dead letter, before any handler ran: it can never be handled as it is. */
function refuse(code: 'UNDECODABLE_MESSAGE' | 'LIMIT_EXCEEDED' | 'TENANT_REQUIRED' | 'INVALID_TENANT', reason: string, ref: MessageRef): DeliveryResult {
  // Its id may be what broke a limit: the error names it, cut to a length every store takes.
  const error = new TidingsError(code, reason, { ref: { ...ref, id: storable(String(ref.id), 300), key: storable(String(ref.key), 300) } });
  return { outcome: 'dead-letter', reason: error.message, error: describeError(error) };
}

/** Why a message's data cannot be handled: an upcaster failed, or the data (upcast or not) breaks the schema. */
function unreadable(error: unknown, contract: AnyContract, version: number | undefined): string {
  if (error instanceof TidingsError && error.code === 'UNDECODABLE_MESSAGE') return error.message;
  const message = (error as Error).message;
  if (version === undefined || version >= contract.version) return `invalid payload: ${message}`;
  const how = contract.upcast?.[version] === undefined ? `as it is (${contract.name} declares no upcaster for version ${version})` : 'after upcasting';
  return `invalid payload: version ${version} of ${contract.name} does not fit version ${contract.version} ${how}: ${message}`;
}

/** The version a CloudEvents type `<topic>.v<n>` names; undefined for a type of another form (a foreign producer's). */
function versionOf(type: string, topic: string): number | undefined {
  if (!type.startsWith(topic) || type.charCodeAt(topic.length) !== 46 /* . */ || type.charCodeAt(topic.length + 1) !== 118 /* v */) return undefined;
  const version = Number(type.slice(topic.length + 2));
  return Number.isSafeInteger(version) ? version : undefined;
}

function checkEnvelope(envelope: Envelope): string | undefined {
  if (typeof envelope.id !== 'string' || envelope.id.length === 0) return 'id is missing';
  if (typeof envelope.type !== 'string' || envelope.type.length === 0) return 'type is missing';
  if (typeof envelope.partitionkey !== 'string') return 'partitionkey is missing';
  if (Number.isNaN(Date.parse(envelope.time))) return `time ${JSON.stringify(envelope.time)} is not a date`;
  return undefined;
}

function runChain<Tx>(
  middleware: readonly Middleware<Tx>[],
  handler: Handler<unknown, Tx>,
  message: Message<unknown>,
  context: HandlerContext<Tx>,
): Promise<Outcome | void> | Outcome | void {
  if (middleware.length === 0) return handler(message, context);
  const step = async (index: number): Promise<Outcome | void> => {
    const layer = middleware[index];
    if (layer === undefined) return handler(message, context);
    return layer(message, context, () => step(index + 1));
  };
  return step(0);
}

/**
 * The timeouts of the handlers in flight. All last the same, so they expire in the order they began: one
 * timer, set for the oldest, serves them all (a timer and a race per message were a tenth of what a
 * drain allocated).
 */
class Deadlines {
  /** In insertion order, which is deadline order. */
  readonly #pending = new Set<Deadline>();
  #timer: NodeJS.Timeout | undefined;

  constructor(private readonly ms: number) {}

  /** What `work` settles to, or the error `expired()` makes if it takes longer than the timeout. */
  race<T>(work: Promise<T> | T, expired: () => Error): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const deadline: Deadline = { at: performance.now() + this.ms, expire: () => reject(expired()) };
      this.#pending.add(deadline);
      this.#timer ??= setTimeout(() => this.#expire(), this.ms);
      Promise.resolve(work).then(
        (value) => {
          this.#settle(deadline);
          resolve(value);
        },
        (error: unknown) => {
          this.#settle(deadline);
          reject(error);
        },
      );
    });
  }

  #settle(deadline: Deadline): void {
    this.#pending.delete(deadline);
    if (this.#pending.size === 0 && this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
  }

  #expire(): void {
    this.#timer = undefined;
    const now = performance.now();
    for (const deadline of this.#pending) {
      if (deadline.at > now) {
        this.#timer = setTimeout(() => this.#expire(), Math.ceil(deadline.at - now));
        return;
      }
      this.#pending.delete(deadline);
      deadline.expire();
    }
  }
}

interface Deadline {
  readonly at: number;
  readonly expire: () => void;
}
