import { setMaxListeners } from 'node:events';
import type { Backbone, Consumer, Delivery, DeliveryHandler, DeliveryResult, Outgoing } from './backbone.ts';
import {
  MAX_NAME_LENGTH,
  validateName,
  validateNow,
  validateReplyNow,
  type AnyRequestContract,
  type ReplyInputOf,
  type ReplyOf,
  type AnyContract,
  type DataOf,
  type InputOf,
} from './contract.ts';
import { keyHash, newId, type Envelope, type Message } from './envelope.ts';
import { TidingsError, type TidingsErrorCode } from './errors.ts';
import { attributeProblem, bytesOver, dataProblem, messageLimits } from './limits.ts';
import { stopOnSignals } from './signals.ts';
import { runForTenant, tenantOfPublish } from './tenant.ts';
import type { PublishedMessage, PublishOptions, RequestOptions } from './publish.ts';
import { sagaHandlers, type SagaDefinition, type SagaStats } from './saga.ts';
import { Schedule, type ScheduleOptions, type TickPublisher } from './schedules.ts';
import { defaultWarning } from './warnings.ts';
import { checkPublishes, describeService, recordService } from './catalog.ts';
import type { AsyncApiDocument, AsyncApiOptions } from '../asyncapi/document.ts';
import { systemClock, type Clock, type ClockTimer } from './clock.ts';
import { createPipeline, handlerScope, type Handler, type Middleware, type ReplyHandler, type Route } from './handler.ts';
import { busDefaults, OptionProblems, optionNames, resolveSubscribeOptions, type ResolvedSubscribeOptions, type SubscribeOptions } from './options.ts';
import type { BusEventListener, BusEventName } from '../telemetry/events.ts';
import { busHealth, type BusHealth, type HealthOptions } from '../telemetry/health.ts';
import { loggerWarning, type Logger } from '../telemetry/logger.ts';
import { checkTelemetryOptions, type TelemetryOptions } from '../telemetry/options.ts';
import { BusTelemetry } from '../telemetry/telemetry.ts';

export type { PublishedMessage, PublishOptions, RequestOptions } from './publish.ts';

export interface BusOptions<Tx> {
  /** This service's name: the CloudEvents `source` of what it publishes. */
  service: string;
  backbone: Backbone<Tx>;
  /** Largest `data` accepted at publish, in bytes of JSON (default 256 KiB). */
  maxPayloadBytes?: number;
  /** Defaults for every subscription of this bus; each `subscribe` may override them. */
  subscriptionDefaults?: SubscribeOptions;
  /** Called with what the bus recovers from by itself (a schedule's tick that could not be published); the logger's warn, else the console, by default. */
  onWarning?: (message: string, error?: unknown) => void;
  /**
   * A pino-style logger (`logger.warn(record, message)`): structured lines with the message id, topic,
   * subscription and attempt for each retry, dead letter and invalid message, and the bus's warnings.
   */
  logger?: Logger;
  /** OpenTelemetry traces and metrics (docs/observability.md): on when `@opentelemetry/api` is installed; `false` turns them off. */
  telemetry?: TelemetryOptions | false;
  /** The clock of scheduled publishes, schedules' ticks and request timeouts: the system's, or a virtual one (tidings/testing). */
  clock?: Clock;
  /** The contracts this service publishes or sends: its `send` operations in AsyncAPI and in the registry (docs/contracts.md). */
  publishes?: readonly AnyContract[];
  /** Every message this bus publishes must carry a tenant: one without fails with TENANT_REQUIRED (docs/tenancy.md). */
  requireTenant?: boolean;
}

const busOptionNames = optionNames<BusOptions<unknown>>()(
  'service',
  'backbone',
  'maxPayloadBytes',
  'subscriptionDefaults',
  'onWarning',
  'clock',
  'publishes',
  'logger',
  'telemetry',
  'requireTenant',
);

export interface SubscriptionStats {
  /** Attempts that succeeded (the message was acknowledged, or will be with its batch). */
  handled: number;
  /** Attempts that failed and were scheduled to try again. */
  retried: number;
  /** Messages sent to dead letters. */
  deadLettered: number;
}

export interface BusStats {
  /** Messages published per topic (in a transaction: counted when written, before the commit). */
  readonly published: Readonly<Record<string, number>>;
  readonly subscriptions: Readonly<Record<string, SubscriptionStats>>;
  /** `bus.request`s this process made: sent, answered, timed out, and replies that came after their timeout. */
  readonly requests: { readonly sent: number; readonly answered: number; readonly timedOut: number; readonly late: number };
  /** Per saga run here: instances started, transitions, completions, and messages ignored after completion or before the start. */
  readonly sagas: Readonly<Record<string, Readonly<SagaStats>>>;
}

/** The handler a contract takes: one that returns the reply for a command that answers, else a plain one. */
export type HandlerFor<C, Tx> = C extends AnyRequestContract ? ReplyHandler<DataOf<C>, ReplyInputOf<C>, Tx> : Handler<DataOf<C>, Tx>;

/** A named consumer group: its handlers, one per contract, share order, retries and dead letters. */
export class Subscription<Tx> {
  readonly routes = new Map<string, Route<Tx>>();
  constructor(
    readonly name: string,
    readonly options: ResolvedSubscribeOptions,
    private readonly bus: Bus<Tx>,
  ) {}

  /** Handles `contract`'s messages with `handler`; `message.data` has the contract's type. */
  on<C extends AnyContract>(contract: C, handler: HandlerFor<C, Tx>): this {
    if (this.routes.has(contract.topic)) {
      throw new TidingsError('SUBSCRIPTION_CONFLICT', `Subscription ${this.name} already handles ${contract.topic}`);
    }
    this.routes.set(contract.topic, { contract, handler: handler as Handler<unknown, Tx> });
    this.bus.changed(this);
    return this;
  }
}

/**
 * The bus: publish and send typed messages, subscribe handlers, and run them. One per service process.
 */
export class Bus<Tx = unknown> {
  readonly service: string;
  readonly backbone: Backbone<Tx>;
  readonly #maxPayloadBytes: number;
  readonly #subscriptionDefaults: SubscribeOptions;
  readonly #warn: (message: string, error?: unknown) => void;
  readonly clock: Clock;
  readonly #telemetry: BusTelemetry;
  readonly #publishes: readonly AnyContract[];
  readonly #requireTenant: boolean;
  readonly #schedules = new Map<string, Schedule>();
  readonly #requests = { sent: 0, answered: 0, timedOut: 0, late: 0 };
  readonly #sagaStats = new Map<string, SagaStats>();
  readonly #subscriptions = new Map<string, Subscription<Tx>>();
  readonly #consumers = new Map<string, Consumer>();
  readonly #middleware: Middleware<Tx>[] = [];
  readonly #started = new Set<string>();
  readonly #published: Record<string, number> = {};
  readonly #counts = new Map<string, SubscriptionStats>();
  /** Errors of subscriptions started in the background, rethrown by stop(). */
  readonly #background: unknown[] = [];
  #stopping = new AbortController();
  #opened: Promise<void> | undefined;
  /** The backbone opened (health checks it only then: a check must not be what opens it). */
  #backboneOpen = false;
  #starting: Promise<void> | undefined;
  #stopped: Promise<void> | undefined;
  #forgetSignals: (() => void) | undefined;
  #state: 'idle' | 'starting' | 'running' | 'stopping' | 'stopped' = 'idle';

  constructor(options: BusOptions<Tx>) {
    const problems = new OptionProblems('createBus');
    problems.unknownKeys(options, busOptionNames);
    problems.check(
      typeof options?.service === 'string' && SERVICE.test(options.service),
      `service ${JSON.stringify(options?.service)} must be a name of letters, digits, ".", "-", "_" or "~" (at most ${MAX_NAME_LENGTH} characters, for example "billing-service"): it becomes the CloudEvents source URI tidings://<service>`,
    );
    problems.check(options?.backbone !== undefined && typeof options.backbone.publish === 'function', 'backbone is required, for example postgres({ url })');
    problems.integer('maxPayloadBytes', options?.maxPayloadBytes, 1);
    checkTelemetryOptions(problems, options?.telemetry, options?.logger);
    problems.oneOf('requireTenant', options?.requireTenant, [true, false]);
    problems.throwIfAny();
    this.service = options.service;
    this.backbone = options.backbone;
    this.#maxPayloadBytes = options.maxPayloadBytes ?? busDefaults.maxPayloadBytes;
    this.#subscriptionDefaults = options.subscriptionDefaults ?? {};
    this.#warn = options.onWarning ?? (options.logger === undefined ? defaultWarning : loggerWarning(options.logger));
    this.clock = options.clock ?? systemClock;
    this.#telemetry = new BusTelemetry({
      backbone: this.backbone as Backbone<unknown>,
      telemetry: options.telemetry,
      logger: options.logger,
      warn: this.#warn,
    });
    this.backbone.observe?.(this.#telemetry);
    this.#publishes = checkPublishes(options.publishes);
    this.#requireTenant = options.requireTenant ?? busDefaults.requireTenant;
    // Every handler in flight listens for the stop; there may be thousands.
    setMaxListeners(0, this.#stopping.signal);
    resolveSubscribeOptions('createBus subscriptionDefaults', this.#subscriptionDefaults);
  }

  /**
   * Listens to what operators need to see: `message:retry`, `message:dead-letter`, `message:invalid`,
   * `lease:lost`, `connection:lost`, `connection:restored` (docs/observability.md). A listener that throws
   * is reported as a warning and cannot break a worker. Returns a function that removes the listener.
   */
  on<E extends BusEventName>(event: E, listener: BusEventListener<E>): () => void {
    return this.#telemetry.events.on(event, listener);
  }

  /**
   * Live (the process should keep running) and ready (started, backbone reachable, relay keeping up), with the
   * reasons when not: what Kubernetes' probes ask (`healthHandler` in tidings serves them over HTTP).
   */
  health(options?: HealthOptions): Promise<BusHealth> {
    const inputs = {
      state: this.#state,
      consumes: this.#subscriptions.size > 0 || this.#schedules.size > 0,
      opened: this.#backboneOpen,
      failures: this.#background,
      backbone: this.backbone as Backbone<unknown>,
      status: () => this.#telemetry.status(),
    };
    return busHealth(inputs, options);
  }

  /** Adds middleware around every handler of this bus, outermost first. */
  use(middleware: Middleware<Tx>): this {
    this.#middleware.push(middleware);
    return this;
  }

  /** Publishes an event. With `{ tx }` it is part of that transaction; inside a handler it joins the handler's. */
  async publish<C extends AnyContract>(contract: C, data: InputOf<C>, options: PublishOptions = {}): Promise<PublishedMessage> {
    const [published] = await this.#publish(contract, [data], options);
    return published!;
  }

  /** Publishes many messages of one contract in one write (and one transaction). */
  publishMany<C extends AnyContract>(contract: C, data: readonly InputOf<C>[], options: PublishOptions = {}): Promise<PublishedMessage[]> {
    return this.#publish(contract, data, options);
  }

  /**
   * Sends a command that answers and waits for its reply (typed and validated by the contract's `reply`):
   * the handler's return value, committed with its acknowledgement. Rejects with REQUEST_TIMEOUT after
   * `timeoutMs` (a reply that comes later is dropped and counted in `stats().requests.late`), with
   * REQUEST_FAILED (the remote error's code and message) if the request ends in dead letters, and with
   * INVALID_PAYLOAD if the reply breaks its schema. Not inside a handler: waiting there would hold the
   * handler's key (use a saga, or publish and handle the answer as a message).
   */
  async request<C extends AnyRequestContract>(contract: C, data: InputOf<C>, options: RequestOptions = {}): Promise<ReplyOf<C>> {
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
    const awaitReply = this.backbone.awaitReply?.bind(this.backbone);
    if (awaitReply === undefined) throw new TidingsError('INVALID_OPTIONS', `The ${this.backbone.name} backbone cannot carry replies`);
    await this.#open();
    const id = publish.id ?? newId();
    const waiting = new AbortController();
    // Waiting before sending: the reply may come before send resolves.
    const answer = awaitReply(id, waiting.signal, () => this.#requests.late++);
    answer.catch(() => undefined);
    this.#requests.sent++;
    let timer: ClockTimer | undefined;
    try {
      await this.send(contract, data, { ...publish, id });
      const timeout = new Promise<never>((_, reject) => {
        timer = this.clock.setTimeout(() => {
          this.#requests.timedOut++;
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
      this.#requests.answered++;
      return (checked instanceof Promise ? await checked : checked) as ReplyOf<C>;
    } finally {
      this.clock.clearTimeout(timer);
      waiting.abort();
    }
  }

  /** Sends a command: like publish, for a contract declared with `defineCommand`. */
  async send<C extends AnyContract>(command: C, data: InputOf<C>, options: PublishOptions = {}): Promise<PublishedMessage> {
    if (command.kind !== 'command') {
      throw new TidingsError('INVALID_CONTRACT', `${command.name} is an event: publish it with bus.publish, or declare it with defineCommand`);
    }
    return this.publish(command, data, options);
  }

  /**
   * Runs `fn` as if no handler were running: what it publishes does not join the current handler's
   * transaction nor inherit its correlation. For work a handler starts and does not wait for (a replica's
   * drift check asked for by a message), which would otherwise publish into a transaction already over.
   */
  detached<T>(fn: () => T): T {
    return handlerScope.exit(fn);
  }

  /**
   * Runs `fn` for `tenant`: every message it publishes carries the tenant (unless a publish names another),
   * and so does what their handlers publish in turn. Inside a handler, only a cross-tenant subscription may
   * switch to another tenant (TENANT_FORBIDDEN otherwise). docs/tenancy.md.
   */
  withTenant<T>(tenant: string, fn: () => T): T {
    return runForTenant(tenant, handlerScope.getStore(), fn);
  }

  /** Runs `fn` in a transaction of the backbone's database; what it publishes is delivered iff it commits. */
  async transaction<T>(fn: (tx: Tx) => Promise<T>): Promise<T> {
    await this.#open();
    return this.backbone.transaction(fn);
  }

  /** Subscribes `handler` to one contract under the consumer group `name`. */
  subscribe<C extends AnyContract>(name: string, contract: C, handler: HandlerFor<C, Tx>, options?: SubscribeOptions): Subscription<Tx> {
    return this.subscription(name, options).on(contract, handler);
  }

  /** Declares a consumer group; add its handlers with `.on(contract, handler)`. */
  subscription(name: string, options?: SubscribeOptions): Subscription<Tx> {
    validateName('Subscription', name);
    if (this.#subscriptions.has(name)) {
      throw new TidingsError('SUBSCRIPTION_CONFLICT', `Subscription ${name} is already declared on this bus; add handlers to it with .on()`);
    }
    const resolved = resolveSubscribeOptions(`subscription ${name}`, { ...this.#subscriptionDefaults, ...options });
    const subscription = new Subscription<Tx>(name, resolved, this);
    this.#subscriptions.set(name, subscription);
    return subscription;
  }

  /** @internal A subscription gained a handler. Once the bus runs, a new subscription starts on the next turn. */
  changed(subscription: Subscription<Tx>): void {
    if (this.#state !== 'running') return;
    if (this.#started.has(subscription.name)) {
      throw new TidingsError('SUBSCRIPTION_CONFLICT', `Subscription ${subscription.name} is running: declare its handlers before it starts`);
    }
    this.#started.add(subscription.name);
    // Deferred so that chained .on() calls made in the same turn all belong to the first start.
    setImmediate(() => {
      // The registry then lists the new subscription too (a failure to write it is only a warning).
      this.#startConsumer(subscription)
        .then(() => recordService(this, this.backbone.contracts?.(), this.#warn))
        .catch((error: unknown) => this.#background.push(error));
    });
  }

  /** Opens the backbone (migrating its storage if needed) and starts every subscription's workers. */
  start(): Promise<void> {
    if (this.#state === 'stopping' || this.#state === 'stopped') {
      return Promise.reject(new TidingsError('STOPPED', 'This bus was stopped; create a new one to start again'));
    }
    this.#starting ??= this.#start();
    return this.#starting;
  }

  async #start(): Promise<void> {
    this.#state = 'starting';
    await this.#open();
    await recordService(this, this.backbone.contracts?.(), this.#warn);
    for (const subscription of this.#subscriptions.values()) {
      if (subscription.routes.size === 0) continue;
      if (this.#state !== 'starting') return; // stop() was called meanwhile
      this.#started.add(subscription.name);
      await this.#startConsumer(subscription);
    }
    if (this.#state !== 'starting') return;
    for (const schedule of this.#schedules.values()) await schedule.start(this.#tickPublisher());
    this.#state = 'running';
  }

  /**
   * Runs a saga (defineSaga) on this bus: a subscription `saga.<name>` of its messages and timeouts, whose
   * transitions load and save the instance's state in the message's transaction. Needs a backbone that keeps
   * saga state (PostgreSQL, memory, or a broker with an outbox).
   */
  saga<S, M extends Record<string, AnyContract>>(definition: SagaDefinition<S, M>, options?: SubscribeOptions): this {
    const store = this.backbone.sagas?.();
    if (store === undefined) throw new TidingsError('INVALID_OPTIONS', `Saga ${definition.name}: the ${this.backbone.name} backbone cannot keep saga state`);
    const stats: SagaStats = { started: 0, transitions: 0, completed: 0, ignoredAfterCompletion: 0, early: 0 };
    const subscription = this.subscription(`saga.${definition.name}`, options);
    for (const { contract, handler } of sagaHandlers(definition, { store }, stats)) subscription.on(contract, handler as Handler<DataOf<AnyContract>, Tx>);
    this.#sagaStats.set(definition.name, stats);
    return this;
  }

  /**
   * Publishes `contract`'s message at every tick of the cron `pattern` (five fields, or six with seconds
   * first), in `options.timezone` (UTC by default): exactly once per tick across every process that declares
   * the same schedule, also while they start, stop and crash. `data` is the message's data, or a function of
   * the tick's time that returns it. A tick missed while no process ran fires once on start (or not, with
   * `missed: 'none'`). Its messages' ids are `<name>@<tick as ISO time>`.
   */
  schedule<C extends AnyContract>(
    name: string,
    pattern: string,
    contract: C,
    data: InputOf<C> | ((tick: Date) => InputOf<C>),
    options: ScheduleOptions = {},
  ): this {
    if (this.#schedules.has(name)) {
      throw new TidingsError(
        'SUBSCRIPTION_CONFLICT',
        `Schedule ${name} is already declared on this bus (${this.#schedules.get(name)!.definition}); give the other one a name of its own`,
      );
    }
    if (this.backbone.claimTick === undefined || this.backbone.lastTick === undefined) {
      throw new TidingsError('INVALID_OPTIONS', `Schedule ${name}: the ${this.backbone.name} backbone cannot run recurring schedules`);
    }
    const schedule = new Schedule(name, pattern, contract, data, options);
    // Fixed data is checked now, so a mistake shows at start, not at the first tick.
    if (typeof data !== 'function') {
      const checked = validateNow(contract, data, { topic: contract.topic });
      if (checked instanceof Promise) checked.catch(() => undefined);
    }
    this.#schedules.set(name, schedule);
    if (this.#state === 'running') void schedule.start(this.#tickPublisher()).catch((error: unknown) => this.#background.push(error));
    return this;
  }

  #tickPublisher(): TickPublisher<Tx> {
    return {
      backbone: this.backbone,
      publish: (contract, data, options) => this.publish(contract, data, options),
      warn: this.#warn,
      clock: this.clock,
    };
  }

  /**
   * Graceful: finishes in-flight handlers, acknowledges them, releases leases, then closes the backbone.
   * Every call gets the same promise, so a SIGINT and a SIGTERM handler, or a framework's hook and your
   * own, may both call it (test/lifecycle.pg.test.ts).
   */
  stop(): Promise<void> {
    this.#stopped ??= this.#stop();
    return this.#stopped;
  }

  async #stop(): Promise<void> {
    this.#forgetSignals?.();
    this.#state = 'stopping';
    // A start in progress finishes first (each consumer it starts is then stopped below); one that fails
    // leaves nothing to stop but the backbone.
    await this.#starting?.catch(() => undefined);
    await Promise.all([...this.#schedules.values()].map((schedule) => schedule.stop()));
    const consumers = [...this.#consumers.values()];
    this.#consumers.clear();
    await Promise.all(consumers.map((consumer) => consumer.stop()));
    this.#stopping.abort(new TidingsError('STOPPED', 'The bus is stopping'));
    if (this.#opened !== undefined) await this.#opened.catch(() => undefined);
    await this.backbone.close();
    this.#state = 'stopped';
    if (this.#background.length > 0) throw new AggregateError(this.#background, 'Subscriptions started after bus.start() failed');
  }

  /**
   * Stops this bus gracefully on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes), then lets the signal
   * end the process, unless the application listens to it too. Without it, Ctrl-C ends the process at
   * once and the messages in flight wait for their lease (`leaseMs`) to move to another worker. Returns a
   * function that removes the handlers; `stop()` removes them too. See src/core/signals.ts for why this is
   * not the default.
   */
  stopOnSignals(): () => void {
    if (this.#stopped !== undefined) return () => undefined;
    this.#forgetSignals ??= stopOnSignals(this);
    return this.#forgetSignals;
  }

  /**
   * What this process has done since it started: messages published per topic, and per subscription the
   * attempts that succeeded, were retried, or sent their message to dead letters.
   */
  stats(): BusStats {
    return {
      published: { ...this.#published },
      subscriptions: Object.fromEntries([...this.#counts].map(([name, counts]) => [name, { ...counts }])),
      requests: { ...this.#requests },
      sagas: Object.fromEntries([...this.#sagaStats].map(([name, counts]) => [name, { ...counts }])),
    };
  }

  #stats(subscription: string): SubscriptionStats {
    let counts = this.#counts.get(subscription);
    if (counts === undefined) {
      counts = { handled: 0, retried: 0, deadLettered: 0 };
      this.#counts.set(subscription, counts);
    }
    return counts;
  }

  get subscriptions(): ReadonlyMap<string, Subscription<Tx>> {
    return this.#subscriptions;
  }

  /** What this service publishes: the `publishes` option's contracts and its schedules'. */
  get publishes(): readonly AnyContract[] {
    return [...this.#publishes, ...[...this.#schedules.values()].map((schedule) => schedule.contract)];
  }

  /**
   * This service's AsyncAPI 3.0 document (src/asyncapi): a channel per topic, `send` operations for what it
   * publishes, `receive` for its subscriptions. A schema that cannot be converted to JSON Schema is
   * described as `{}` and named to `onWarning`.
   */
  async asyncapi(options: AsyncApiOptions = {}): Promise<AsyncApiDocument> {
    const { asyncapiDocument } = await import('../asyncapi/document.ts');
    return asyncapiDocument([describeService(this)], { ...options, onWarning: options.onWarning ?? ((message: string) => this.#warn(message)) });
  }

  #open(): Promise<void> {
    if (this.#state === 'stopped') return Promise.reject(new TidingsError('STOPPED', 'This bus was stopped'));
    // Telemetry first: the backbone may start its relay as it opens, and the relay's spans need the tracer.
    this.#opened ??= this.#telemetry
      .load()
      .then(() => this.backbone.open())
      .then(() => {
        this.#backboneOpen = true;
      });
    return this.#opened;
  }

  async #startConsumer(subscription: Subscription<Tx>): Promise<void> {
    const { options } = subscription;
    const counts = this.#stats(subscription.name);
    const pipeline = createPipeline<Tx>({
      subscription: subscription.name,
      routes: subscription.routes,
      retry: options.retry,
      timeoutMs: options.timeoutMs,
      requireTenant: options.requireTenant,
      crossTenant: options.crossTenant,
      middleware: this.#middleware,
      stopping: this.#stopping.signal,
      publish: (contract, data, publishOptions, parent, tx) => {
        const inherited: PublishOptions = { tx, ...inherit(parent), ...publishOptions };
        return this.publish(contract, data as InputOf<typeof contract>, inherited);
      },
      reply: async (request, reply, tx) => {
        await this.backbone.reply?.(request.id, { data: reply }, tx);
      },
    });
    const count = (delivery: Delivery<Tx>, result: DeliveryResult): DeliveryResult => {
      if (result.outcome === 'ack') {
        counts.handled++;
        return result;
      }
      if (result.outcome === 'retry') counts.retried++;
      else counts.deadLettered++;
      this.#telemetry.failed(subscription.name, delivery, result);
      return result;
    };
    const requests = new Set([...subscription.routes.values()].filter((route) => route.contract.reply !== undefined).map((route) => route.contract.topic));
    /**
     * A request that ends in dead letters answers with its error at once, on its own: whoever waits for it
     * learns why rather than waiting out its timeout. (Should the dead letter be rolled back after all, and the
     * request succeed on a later delivery, this first answer stands.)
     */
    const answerFailure = (delivery: Delivery<Tx>, result: DeliveryResult): DeliveryResult => {
      if (result.outcome === 'dead-letter' && requests.has(delivery.envelope.topic)) {
        this.backbone.reply?.(delivery.envelope.id, { error: result.error }).catch((error: unknown) => {
          this.#warn(`Subscription ${subscription.name}: could not answer request ${delivery.envelope.id} with its error; it waits for its timeout`, error);
        });
      }
      return result;
    };
    const handle: DeliveryHandler<Tx> = this.#telemetry.consumer(
      subscription.name,
      requests.size === 0
        ? (delivery) => pipeline(delivery).then((result) => count(delivery, result))
        : (delivery) => pipeline(delivery).then((result) => count(delivery, answerFailure(delivery, result))),
    );
    const consumer = await this.backbone.consume(
      {
        name: subscription.name,
        topics: [...subscription.routes.keys()],
        partitions: options.partitions,
        concurrency: options.concurrency,
        batchSize: options.batchSize,
        inbox: options.inbox,
        startFrom: options.startFrom,
        retry: options.retry,
        crossTenant: options.crossTenant,
        tenantShares:
          options.tenantConcurrency === undefined && Object.keys(options.tenantWeights).length === 0
            ? undefined
            : { perTenant: options.tenantConcurrency, weights: options.tenantWeights },
        commands: [...subscription.routes.values()].filter((route) => route.contract.kind === 'command').map((route) => route.contract.topic),
      },
      handle,
    );
    this.#consumers.set(subscription.name, consumer);
  }

  async #publish(contract: AnyContract, items: readonly unknown[], options: PublishOptions): Promise<PublishedMessage[]> {
    if (this.#state === 'stopped') throw new TidingsError('STOPPED', `Cannot publish ${contract.name}: the bus is stopped`);
    const scope = handlerScope.getStore();
    // Inside a handler, a publish joins the handler's transaction and carries its correlation, so it is
    // delivered iff the handled message is acknowledged.
    const tenant = tenantOfPublish({ contract, named: options.tenant, handler: scope, required: this.#requireTenant });
    const inherited: PublishOptions = scope === undefined ? options : { ...inherit(scope.message), tx: scope.delivery.tx, ...options };
    const effective: PublishOptions = inherited.tenant === tenant ? inherited : { ...inherited, tenant };
    const time = new Date().toISOString();
    const broken = attributeProblem(
      {
        subject: effective.subject,
        tenant: effective.tenant,
        correlationid: effective.correlationId,
        causationid: effective.causationId,
        traceparent: effective.traceparent,
        tracestate: effective.tracestate,
      },
      true,
    );
    if (broken !== undefined) throw limitError(contract, `publish options: ${broken}`, {});
    const dueAt = dueTime(contract, effective, this.clock.now());
    if (dueAt !== undefined && this.backbone.cancelScheduled === undefined) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Cannot publish ${contract.name} for later: the ${this.backbone.name} backbone cannot schedule delivery${this.backbone.name === 'postgres' || this.backbone.name === 'memory' ? '' : ' without an outbox database (give it outbox: postgres({ url }))'}`,
      );
    }
    // Every message is validated before any is written or serialised: a bad one stops them all.
    const checked: Checked[] = [];
    for (const data of items) {
      const item = tooDeep(contract, () => this.#check(contract, data, effective, items.length === 1));
      checked.push(item instanceof Promise ? await item : item);
    }
    await this.#open();
    // A tenant's quota counts what callers publish for it; what its handlers publish follows from messages it admitted.
    if (tenant !== undefined && scope === undefined) await this.backbone.admit?.(tenant, contract, checked.length, effective.tx as Tx | undefined);
    // With tracing, the publish's span is the messages' creation context: their traceparent names it.
    const span = this.#telemetry.tracing?.publish(contract.topic, checked.length, checked[0]?.id, effective, scope?.delivery);
    const traced = span?.headers === undefined ? effective : { ...effective, ...span.headers };
    const seal = (item: Checked) => tooDeep(contract, () => this.#seal(contract, item, traced, time, dueAt));
    const tx = effective.tx as Tx | undefined;
    const publishChunks = this.backbone.publishChunks?.bind(this.backbone);
    try {
      if (publishChunks !== undefined && checked.length > STREAM_CHUNK && dueAt === undefined) {
        const chunks = chunked(checked, STREAM_CHUNK, seal);
        await (tx !== undefined ? publishChunks(chunks, tx) : this.backbone.transaction((own) => publishChunks(chunks, own)));
      } else {
        await this.backbone.publish(checked.map(seal), tx);
      }
    } catch (error) {
      span?.end(error);
      throw error;
    }
    span?.end();
    this.#published[contract.topic] = (this.#published[contract.topic] ?? 0) + checked.length;
    this.#telemetry.published(contract.topic, checked.length);
    if (dueAt === undefined) return checked.map(({ id, key }) => ({ id, topic: contract.topic, key }));
    const deliverAt = new Date(dueAt);
    return checked.map(({ id, key }) => ({ id, topic: contract.topic, key, deliverAt }));
  }

  /**
   * Cancels a message published for later (`deliverAt`, `delayMs`) that is not due yet: true if it was
   * cancelled (it will never be delivered), false if it was delivered already, is being delivered, or is
   * unknown. Either one or the other, never both, however close to its due time.
   */
  async cancelScheduled(id: string): Promise<boolean> {
    await this.#open();
    if (this.backbone.cancelScheduled === undefined) {
      throw new TidingsError('INVALID_OPTIONS', `The ${this.backbone.name} backbone cannot schedule delivery, so there is nothing to cancel`);
    }
    return this.backbone.cancelScheduled(id);
  }

  /** Validates one message's data and finds its key. */
  #check(contract: AnyContract, data: unknown, options: PublishOptions, single: boolean): Checked | Promise<Checked> {
    const id = single && options.id !== undefined ? options.id : newId();
    const parsed = validateNow(contract, data, { id, topic: contract.topic });
    return parsed instanceof Promise
      ? parsed.then((value) => this.#keyed(contract, id, data, value, options))
      : this.#keyed(contract, id, data, parsed, options);
  }

  /** Finds a validated message's key. */
  #keyed(contract: AnyContract, id: string, data: unknown, parsed: unknown, options: PublishOptions): Checked {
    const key = options.key ?? (contract.key === undefined ? id : contract.key(parsed));
    if (typeof key !== 'string' || key.length === 0) {
      throw new TidingsError('INVALID_PAYLOAD', `The key function of ${contract.name} returned ${JSON.stringify(key)}; it must return a non-empty string`, {
        ref: { id, topic: contract.topic },
      });
    }
    const idBytes = bytesOver(id, messageLimits.idBytes);
    if (idBytes !== undefined) throw limitError(contract, `id is ${idBytes} bytes, over the limit of ${messageLimits.idBytes}`, { topic: contract.topic });
    const keyBytes = bytesOver(key, messageLimits.keyBytes);
    if (keyBytes !== undefined) {
      throw limitError(contract, `key is ${keyBytes} bytes, over the limit of ${messageLimits.keyBytes}; use a shorter key (a hash of it keeps the order)`, {
        id,
        topic: contract.topic,
      });
    }
    const problem = dataProblem(data);
    if (problem !== undefined) {
      throw new TidingsError(problem.code, `Payload for ${contract.name} cannot be published: ${problem.message}`, { ref: { id, topic: contract.topic, key } });
    }
    return { id, key, data };
  }

  /** Serialises a checked message into its envelope. */
  #seal(contract: AnyContract, { id, key, data }: Checked, options: PublishOptions, time: string, dueAt: number | undefined): Outgoing {
    const json = JSON.stringify(data);
    if (json === undefined) {
      throw new TidingsError('INVALID_PAYLOAD', `Payload for ${contract.name} cannot be serialised as JSON`, { ref: { id, topic: contract.topic, key } });
    }
    // Length in UTF-16 units is at most the UTF-8 byte length for ASCII; measure bytes only near the limit.
    if (json.length * 3 > this.#maxPayloadBytes && Buffer.byteLength(json) > this.#maxPayloadBytes) {
      throw new TidingsError(
        'PAYLOAD_TOO_LARGE',
        `Payload for ${contract.name} is ${Buffer.byteLength(json)} bytes, over the limit of ${this.#maxPayloadBytes} (maxPayloadBytes); store large data elsewhere and publish a reference to it`,
        { ref: { id, topic: contract.topic, key } },
      );
    }
    const envelope: Envelope = {
      specversion: '1.0',
      id,
      source: `tidings://${this.service}`,
      type: contract.type,
      time,
      subject: options.subject,
      datacontenttype: 'application/json',
      topic: contract.topic,
      partitionkey: key,
      tenant: options.tenant,
      correlationid: options.correlationId ?? id,
      causationid: options.causationId,
      traceparent: options.traceparent,
      tracestate: options.tracestate,
      data,
    };
    return dueAt === undefined ? { envelope, json, keyHash: keyHash(key) } : { envelope, json, keyHash: keyHash(key), dueAt };
  }
}

/**
 * A `publishMany` larger than this is handed to a backbone that can take it in chunks (Backbone.publishChunks)
 * this many at a time, in the caller's transaction or one of its own: large enough that a chunk costs little
 * next to its rows, small enough that the first reaches the database early.
 */
const STREAM_CHUNK = 250;

/** A message validated and keyed, not yet serialised. */
interface Checked {
  readonly id: string;
  readonly key: string;
  readonly data: unknown;
}

/** `items` in chunks of `size`, each mapped by `map` only when the consumer of the iterable reaches it. */
function* chunked<T, U>(items: readonly T[], size: number, map: (item: T) => U): Generator<U[]> {
  for (let first = 0; first < items.length; first += size) yield items.slice(first, first + size).map(map);
}

/** Runs `fn`, turning a stack overflow (a payload nested deeper than the schema library or JSON.stringify can go) into INVALID_PAYLOAD. */
function tooDeep<T>(contract: AnyContract, fn: () => T): T {
  const deep = (error: unknown): never => {
    if (!(error instanceof RangeError)) throw error;
    throw new TidingsError('INVALID_PAYLOAD', `Payload for ${contract.name} is nested too deeply to validate or serialise (${error.message}); flatten it`, {
      cause: error,
      ref: { topic: contract.topic },
    });
  };
  try {
    const result = fn();
    return (result instanceof Promise ? result.catch(deep) : result) as T;
  } catch (error) {
    return deep(error);
  }
}

/**
 * When a message published with `deliverAt` or `delayMs` is due (epoch ms), or undefined to deliver it now
 * (neither given, or a time already past). A date that is not one, or a negative delay, is refused by name.
 */
function dueTime(contract: AnyContract, options: PublishOptions, now: number): number | undefined {
  const { deliverAt, delayMs } = options;
  if (deliverAt === undefined && delayMs === undefined) return undefined;
  const refuse = (problem: string) => new TidingsError('INVALID_OPTIONS', `Invalid options for publishing ${contract.name}: ${problem}`);
  if (deliverAt !== undefined && delayMs !== undefined) throw refuse('give deliverAt or delayMs, not both');
  let due: number;
  if (delayMs !== undefined) {
    if (typeof delayMs !== 'number' || !Number.isFinite(delayMs) || delayMs < 0)
      throw refuse(`delayMs must be a number of milliseconds >= 0, got ${JSON.stringify(delayMs)}`);
    due = now + delayMs;
  } else {
    due =
      deliverAt instanceof Date
        ? deliverAt.getTime()
        : typeof deliverAt === 'number'
          ? deliverAt
          : typeof deliverAt === 'string'
            ? Date.parse(deliverAt)
            : Number.NaN;
    if (!Number.isFinite(due)) throw refuse(`deliverAt must be a Date, an ISO 8601 string or epoch milliseconds, got ${JSON.stringify(deliverAt)}`);
  }
  return due > now ? due : undefined;
}

/** The codes of a request's remote error that a requester can act on as they are; any other is REQUEST_FAILED. */
const PASSED_ON: readonly TidingsErrorCode[] = ['INVALID_PAYLOAD', 'LIMIT_EXCEEDED', 'PAYLOAD_TOO_LARGE', 'UNDECODABLE_MESSAGE', 'HANDLER_TIMEOUT'];

/** Letters, digits and the other characters a URI authority takes unescaped. */
const SERVICE = new RegExp(`^[A-Za-z0-9._~-]{1,${MAX_NAME_LENGTH}}$`);

function limitError(contract: AnyContract, problem: string, ref: { id?: string; topic?: string }): TidingsError {
  return new TidingsError('LIMIT_EXCEEDED', `Cannot publish ${contract.name}: ${problem}`, { ref: { topic: contract.topic, ...ref } });
}

/** What a message published while handling `parent` inherits from it. */
function inherit(parent: Message<unknown>): PublishOptions {
  return {
    correlationId: parent.correlationId,
    causationId: parent.id,
    ...(parent.tenant === undefined ? {} : { tenant: parent.tenant }),
    ...(parent.traceparent === undefined ? {} : { traceparent: parent.traceparent }),
    ...(parent.tracestate === undefined ? {} : { tracestate: parent.tracestate }),
  };
}

export function createBus<Tx>(options: BusOptions<Tx>): Bus<Tx> {
  return new Bus(options);
}
