/**
 * The bus, the public face of Tidings: publish, send and request typed messages, declare subscriptions,
 * sagas and schedules, and run them on a backbone, from start to a graceful stop. The work is done beside
 * it: bus-options.ts (createBus's options), outgoing.ts (a publish's checks, envelope and hand-over),
 * requests.ts (request and reply), subscription.ts (a consumer group and starting its consumer), saga.ts and
 * schedules.ts, and telemetry (src/telemetry).
 */
import { setMaxListeners } from 'node:events';
import type { Backbone, Consumer } from './backbone.ts';
import { busSettings, type BusOptions } from './bus-options.ts';
import { describeService, recordService } from './catalog.ts';
import type { Clock } from './clock.ts';
import { validateName, type AnyContract, type AnyRequestContract, type InputOf, type ReplyOf } from './contract.ts';
import { TidingsError } from './errors.ts';
import type { Middleware } from './handler.ts';
import { resolveSubscribeOptions, type SubscribeOptions } from './options.ts';
import { Publisher } from './outgoing.ts';
import type { PublishedMessage, PublishOptions, RequestOptions } from './publish.ts';
import { Requester, type RequestStats } from './requests.ts';
import { sagaRun, type SagaDefinition, type SagaStats } from './saga.ts';
import { Schedules, type ScheduleOptions } from './schedules.ts';
import { handlerScope } from './scope.ts';
import { stopOnSignals } from './signals.ts';
import { startConsumer, Subscription, type HandlerFor, type SubscriptionStats } from './subscription.ts';
import { runForTenant } from './tenant.ts';
import type { AsyncApiDocument, AsyncApiOptions } from '../asyncapi/document.ts';
import type { BusEventListener, BusEventName } from '../telemetry/events.ts';
import { busHealth, type BusHealth, type HealthOptions } from '../telemetry/health.ts';
import type { BusTelemetry } from '../telemetry/telemetry.ts';

export interface BusStats {
  /** Messages published per topic (in a transaction: counted when written, before the commit). */
  readonly published: Readonly<Record<string, number>>;
  readonly subscriptions: Readonly<Record<string, SubscriptionStats>>;
  /** `bus.request`s this process made: sent, answered, timed out, and replies that came after their timeout. */
  readonly requests: Readonly<RequestStats>;
  /** Per saga run here: instances started, transitions, completions, and messages ignored after completion or before the start. */
  readonly sagas: Readonly<Record<string, Readonly<SagaStats>>>;
}

/**
 * The bus: publish and send typed messages, subscribe handlers, and run them. One per service process.
 */
export class Bus<Tx = unknown> {
  readonly service: string;
  readonly backbone: Backbone<Tx>;
  readonly clock: Clock;
  readonly #subscriptionDefaults: SubscribeOptions;
  readonly #warn: (message: string, error?: unknown) => void;
  readonly #telemetry: BusTelemetry;
  readonly #publishes: readonly AnyContract[];
  readonly #publisher: Publisher<Tx>;
  readonly #requester: Requester;
  readonly #schedules: Schedules;
  readonly #sagaStats = new Map<string, SagaStats>();
  readonly #subscriptions = new Map<string, Subscription<Tx>>();
  readonly #consumers = new Map<string, Consumer>();
  readonly #middleware: Middleware<Tx>[] = [];
  readonly #started = new Set<string>();
  readonly #counts = new Map<string, SubscriptionStats>();
  /** Errors of subscriptions started in the background, rethrown by stop(). */
  readonly #background: unknown[] = [];
  #stopping = new AbortController();
  readonly #stopGraceMs: number;
  #opened: Promise<void> | undefined;
  /** The backbone opened (health checks it only then: a check must not be what opens it). */
  #backboneOpen = false;
  #starting: Promise<void> | undefined;
  #stopped: Promise<void> | undefined;
  #forgetSignals: (() => void) | undefined;
  #state: 'idle' | 'starting' | 'running' | 'stopping' | 'stopped' = 'idle';

  constructor(options: BusOptions<Tx>) {
    const settings = busSettings(options);
    this.service = settings.service;
    this.backbone = settings.backbone;
    this.clock = settings.clock;
    this.#subscriptionDefaults = settings.subscriptionDefaults;
    this.#warn = settings.warn;
    this.#telemetry = settings.telemetry;
    this.#publishes = settings.publishes;
    this.#stopGraceMs = settings.stopGraceMs;
    this.backbone.observe?.(this.#telemetry);
    const open = () => this.#open();
    this.#publisher = new Publisher({ ...settings, open });
    this.#requester = new Requester({
      backbone: this.backbone as Backbone<unknown>,
      clock: this.clock,
      open,
      send: (contract, data, publish) => this.send(contract, data as InputOf<typeof contract>, publish),
    });
    this.#schedules = new Schedules({
      backbone: this.backbone as Backbone<unknown>,
      publish: (contract, data, publish) => this.publish(contract, data, publish),
      warn: this.#warn,
      clock: this.clock,
    });
    // Every handler in flight listens for the stop; there may be thousands.
    setMaxListeners(0, this.#stopping.signal);
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

  /**
   * Sends a command that answers and waits for its reply (typed and validated by the contract's `reply`):
   * the handler's return value, committed with its acknowledgement. Rejects with REQUEST_TIMEOUT after
   * `timeoutMs` (a reply that comes later is dropped and counted in `stats().requests.late`), with
   * REQUEST_FAILED (the remote error's code and message) if the request ends in dead letters, and with
   * INVALID_PAYLOAD if the reply breaks its schema. Not inside a handler: waiting there would hold the
   * handler's key (use a saga, or publish and handle the answer as a message).
   */
  request<C extends AnyRequestContract>(contract: C, data: InputOf<C>, options: RequestOptions = {}): Promise<ReplyOf<C>> {
    return this.#requester.request(contract, data, options);
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
    await this.#schedules.startAll();
    this.#state = 'running';
  }

  /**
   * Runs a saga (defineSaga) on this bus: a subscription `saga.<name>` of its messages and timeouts, whose
   * transitions load and save the instance's state in the message's transaction. Needs a backbone that keeps
   * saga state (PostgreSQL, memory, or a broker with an outbox).
   */
  saga<S, M extends Record<string, AnyContract>>(definition: SagaDefinition<S, M>, options?: SubscribeOptions): this {
    const run = sagaRun(definition, this.backbone);
    const subscription = this.subscription(run.subscription, options);
    for (const { contract, handler } of run.handlers) subscription.on(contract, handler as HandlerFor<AnyContract, Tx>);
    this.#sagaStats.set(definition.name, run.stats);
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
    const schedule = this.#schedules.add(name, pattern, contract, data, options);
    if (this.#state === 'running') void this.#schedules.start(schedule).catch((error: unknown) => this.#background.push(error));
    return this;
  }

  /**
   * Graceful: finishes in-flight handlers, acknowledges them, releases leases, then closes the backbone.
   * Handlers still running after `stopGraceMs` (default 10 s) see their `ctx.signal` aborted (a STOPPED
   * error), so one that waits on it ends; its message is delivered again later. Every call gets the same
   * promise, so a SIGINT and a SIGTERM handler, or a framework's hook and your own, may both call it
   * (test/lifecycle.pg.test.ts).
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
    await this.#schedules.stop();
    const consumers = [...this.#consumers.values()];
    this.#consumers.clear();
    // The handlers in flight finish first; those still running after the grace are told, through ctx.signal.
    const stopping = () => this.#stopping.abort(new TidingsError('STOPPED', 'The bus is stopping'));
    const grace = setTimeout(stopping, this.#stopGraceMs);
    try {
      await Promise.all(consumers.map((consumer) => consumer.stop()));
    } finally {
      clearTimeout(grace);
    }
    stopping();
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
      published: { ...this.#publisher.counts },
      subscriptions: Object.fromEntries([...this.#counts].map(([name, counts]) => [name, { ...counts }])),
      requests: { ...this.#requester.counts },
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
    return [...this.#publishes, ...this.#schedules.contracts];
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
    const consumer = await startConsumer(subscription, {
      backbone: this.backbone,
      telemetry: this.#telemetry,
      warn: this.#warn,
      middleware: this.#middleware,
      stopping: this.#stopping.signal,
      counts: this.#stats(subscription.name),
      publish: (contract, data, options) => this.publish(contract, data as InputOf<typeof contract>, options),
    });
    this.#consumers.set(subscription.name, consumer);
  }

  async #publish(contract: AnyContract, items: readonly unknown[], options: PublishOptions): Promise<PublishedMessage[]> {
    if (this.#state === 'stopped') throw new TidingsError('STOPPED', `Cannot publish ${contract.name}: the bus is stopped`);
    return this.#publisher.publish(contract, items, options);
  }
}

export function createBus<Tx>(options: BusOptions<Tx>): Bus<Tx> {
  return new Bus(options);
}
