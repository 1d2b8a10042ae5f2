/**
 * A backbone per tenant ("deployment stamps"): every tenant has a backbone of its own (a schema, a database, a
 * RabbitMQ vhost, a NATS subject prefix), and this backbone routes to them by tenant. Publishing writes each
 * message to its tenant's stamp; a subscription runs on every stamp (and on stamps added later); a handler's
 * `ctx.tx` and `bus.transaction()` inside `bus.withTenant` are transactions of the tenant's stamp. Nothing of
 * one tenant is ever written to another's stamp, and a stamp that is down holds up its tenant alone.
 * docs/tenancy.md ("A backbone per tenant") compares it with shared tables under row-level security.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { Backbone, Consumer, Delivery, DeliveryHandler, DeliveryResult, Outgoing, Reply, SagaStore, SubscriptionSpec } from '../core/backbone.ts';
import type { ContractRegistry, RecordedService, ServiceRecord } from '../core/catalog.ts';
import type { AnyContract } from '../core/contract.ts';
import { errorMessage, TidingsError } from '../core/errors.ts';
import { checkTenant, currentTenant } from '../core/tenant.ts';
import type { BackboneStatus, HealthCheck, SubscriptionState } from '../telemetry/status.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import { StampDeadLetters } from './dead-letters.ts';
import { resolveTenantStampsOptions, type TenantStampsOptions, type TenantStampsSettings } from './options.ts';
import { Stamp } from './stamp.ts';

/** A subscription running on the stamps: its consumer on each stamp, started as stamps open. */
interface Consumption<Tx> {
  readonly spec: SubscriptionSpec;
  readonly handle: DeliveryHandler<Tx>;
  readonly consumers: Map<Stamp<Tx>, Promise<Consumer>>;
}

/**
 * What a part built on the stamps (a replica per stamp) learns of them: a stamp opened, or was removed.
 * `opened` is awaited before anything is published to the stamp or handled in it (so what it makes there,
 * tables say, exists before use); a listener that fails is reported through onWarning and holds nothing up.
 */
export interface StampListener<Tx> {
  /** The stamp of `tenant` opened (at start, when added, or back after being down), with its open backbone. */
  opened?(tenant: string, backbone: Backbone<Tx>): void | Promise<void>;
  /** The stamp of `tenant` was removed: its consumers have stopped, its backbone is about to close. */
  removed?(tenant: string): void | Promise<void>;
}

export class TenantStamps<Tx> implements Backbone<Tx> {
  readonly name = 'stamps';
  readonly #settings: TenantStampsSettings<Tx>;
  readonly #stamps = new Map<string, Stamp<Tx>>();
  readonly #running = new Set<Consumption<Tx>>();
  /** The stamp each transaction belongs to (those the stamps opened, and deliveries' `tx`). */
  readonly #owners = new WeakMap<object, Stamp<Tx>>();
  /** The stamp whose delivery is being handled, for what the core does after the handler (a request's error answer). */
  readonly #delivering = new AsyncLocalStorage<Stamp<Tx>>();
  readonly #reopening = new Map<Stamp<Tx>, NodeJS.Timeout>();
  /** Stamps that could not open and were reported so (once per outage). */
  readonly #down = new Set<Stamp<Tx>>();
  /** The services' records written to the registries, for stamps that open later (contracts()). */
  readonly #records = new Map<string, ServiceRecord>();
  readonly #listeners = new Set<StampListener<Tx>>();
  #opening: Promise<void> | undefined;
  #closed = false;
  #observer: BackboneObserver | undefined;

  constructor(options: TenantStampsOptions<Tx>) {
    this.#settings = resolveTenantStampsOptions(options);
  }

  /** The tenants with a stamp, in the order they were added. */
  tenants(): string[] {
    return [...this.#stamps.keys()];
  }

  /** The backbone of `tenant`'s stamp, for what only it can do (its own dead letters, its driver); TENANT_UNKNOWN if none. */
  stamp(tenant: string): Backbone<Tx> {
    return this.#stampOf(tenant, 'stamp()').backbone;
  }

  /**
   * Tells `listener` of stamps opening and being removed; it hears at once (not awaited) of the stamps open
   * now, so that one added after the bus started misses none. Returns a function that stops telling it.
   */
  onStamp(listener: StampListener<Tx>): () => void {
    this.#listeners.add(listener);
    for (const stamp of this.#stamps.values()) {
      if (stamp.opened) void this.#tell(stamp, listener, 'opened');
    }
    return () => this.#listeners.delete(listener);
  }

  /**
   * Adds a tenant at run time: makes its backbone, opens it, and starts every running subscription on it.
   * Resolves once it runs; rejects (and keeps the stamp, to be opened again) if it cannot open.
   */
  async addTenant(tenant: string): Promise<void> {
    checkTenant(tenant, 'addTenant');
    if (this.#stamps.has(tenant)) throw new TidingsError('INVALID_OPTIONS', `Tenant ${tenant} has a stamp already; each tenant has one`);
    await this.#opening;
    const stamp = this.#add(tenant);
    if (this.#opening === undefined) return; // it opens with the others
    try {
      await stamp.open();
    } catch (error) {
      this.#reopenLater(stamp);
      throw error;
    }
  }

  /**
   * Removes a tenant at run time: its publishes fail with TENANT_UNKNOWN from now on, its subscriptions'
   * consumers stop (handlers in flight finish and are acknowledged), and its backbone is closed. Its data stays
   * in its stamp (a schema, a database, a vhost: drop or purge it yourself); `addTenant` serves it again.
   */
  async removeTenant(tenant: string): Promise<void> {
    const stamp = this.#stampOf(tenant, 'removeTenant()');
    this.#stamps.delete(tenant);
    clearTimeout(this.#reopening.get(stamp));
    this.#reopening.delete(stamp);
    this.#down.delete(stamp);
    const consumers = [...this.#running].flatMap((consumption) => {
      const consumer = consumption.consumers.get(stamp);
      consumption.consumers.delete(stamp);
      return consumer === undefined ? [] : [consumer];
    });
    const stopped = await Promise.allSettled(consumers.map(async (consumer) => (await consumer).stop()));
    await Promise.all([...this.#listeners].map((listener) => this.#tell(stamp, listener, 'removed')));
    if (stamp.opened) await stamp.backbone.close();
    stamp.closed();
    const failed = stopped.find((result) => result.status === 'rejected');
    if (failed !== undefined) throw (failed as PromiseRejectedResult).reason;
  }

  observe(observer: BackboneObserver): void {
    this.#observer = observer;
    for (const stamp of this.#stamps.values()) stamp.backbone.observe?.(observer);
  }

  /**
   * Reads the tenants and opens every stamp. A stamp that cannot open does not stop the others: it is
   * reported (onWarning) and opened again every `reopenMs`, and its tenant's publishes fail meanwhile. Only if
   * no stamp opens does this reject.
   */
  open(): Promise<void> {
    this.#closed = false;
    this.#opening ??= this.#open().catch((error: unknown) => {
      this.#opening = undefined;
      throw error;
    });
    return this.#opening;
  }

  async #open(): Promise<void> {
    const tenants = await this.#settings.tenants();
    for (const tenant of tenants) {
      checkTenant(tenant, 'tenants');
      if (!this.#stamps.has(tenant)) this.#add(tenant);
    }
    if (this.#stamps.size === 0) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        'tenantStamps(): there are no tenants, so there is no stamp to open: list some in tenants, or add one with addTenant(tenant)',
      );
    }
    const stamps = [...this.#stamps.values()];
    const results = await Promise.allSettled(stamps.map((stamp) => stamp.open()));
    const failed = stamps.filter((_, i) => results[i]!.status === 'rejected');
    if (failed.length === stamps.length) {
      throw new TidingsError(
        'BACKBONE_UNAVAILABLE',
        `No stamp could open (${failed.map((stamp) => `${stamp.tenant}: ${errorMessage(stamp.failure)}`).join('; ')}): check each tenant's backbone`,
        { cause: failed[0]!.failure, retryable: true },
      );
    }
    for (const stamp of failed) this.#reopenLater(stamp);
  }

  /** Writes each message to its tenant's stamp; a transaction's messages must all be its stamp's tenant's. */
  async publish(messages: readonly Outgoing[], tx?: Tx): Promise<void> {
    if (tx !== undefined) {
      const owner = this.#ownerOf(tx);
      for (const message of messages) {
        const tenant = this.#tenantOf(message);
        if (owner !== undefined && tenant !== owner.tenant) {
          throw new TidingsError(
            'TENANT_FORBIDDEN',
            `Cannot publish ${message.envelope.topic} (message ${message.envelope.id}) for tenant ${tenant} in a transaction of tenant ${owner.tenant}'s stamp: each tenant's messages are written to its own stamp. Publish it outside this transaction, with { tenant: '${tenant}' }`,
            { ref: { id: message.envelope.id, topic: message.envelope.topic } },
          );
        }
      }
      // A transaction the stamps did not open (the caller's own client) belongs to the messages' tenant's stamp.
      const stamp = owner ?? this.#single(messages);
      await this.#ready(stamp);
      await stamp.backbone.publish(messages, tx);
      return;
    }
    const byTenant = new Map<Stamp<Tx>, Outgoing[]>();
    for (const message of messages) {
      const stamp = this.#stampOf(this.#tenantOf(message), `Cannot publish ${message.envelope.topic} (message ${message.envelope.id})`);
      byTenant.set(stamp, [...(byTenant.get(stamp) ?? []), message]);
    }
    // Each stamp on its own: one that is down fails its tenant's messages, not the others'.
    const written = await Promise.allSettled(
      [...byTenant].map(async ([stamp, own]) => {
        await this.#ready(stamp);
        await stamp.backbone.publish(own);
      }),
    );
    const failed = [...byTenant.keys()].filter((_, i) => written[i]!.status === 'rejected');
    if (failed.length === 0) return;
    const first = (written.find((w) => w.status === 'rejected') as PromiseRejectedResult).reason;
    if (byTenant.size === 1) throw first;
    const done = [...byTenant.keys()].filter((stamp) => !failed.includes(stamp)).map((stamp) => stamp.tenant);
    throw new TidingsError(
      'PUBLISH_FAILED',
      `Publishing for tenants ${failed.map((stamp) => stamp.tenant).join(', ')} failed (${errorMessage(first)}); the messages of ${done.join(', ') || 'no other tenant'} were written: publish again only the failed tenants' messages (their ids are kept, so an inbox de-duplicates them)`,
      { cause: first, retryable: true },
    );
  }

  /** Passes the tenant's quota check to its stamp. */
  async admit(tenant: string, contract: AnyContract, count: number, tx?: Tx): Promise<void> {
    const stamp = (tx === undefined ? undefined : this.#ownerOf(tx)) ?? this.#stampOf(tenant, `Cannot publish ${contract.name}`);
    await this.#ready(stamp);
    await stamp.backbone.admit?.(tenant, contract, count, tx);
  }

  /**
   * A transaction of the current tenant's stamp: `bus.withTenant(tenant, () => bus.transaction(fn))`, or the
   * handled message's tenant inside a handler. TENANT_REQUIRED without a tenant: which database would it be?
   */
  async transaction<T>(fn: (tx: Tx) => Promise<T>): Promise<T> {
    const stamp = this.#current('bus.transaction()');
    await this.#ready(stamp);
    return stamp.backbone.transaction((tx) => {
      this.#own(tx, stamp);
      return fn(tx);
    });
  }

  /** Runs the subscription on every stamp that is open, and on each stamp as it opens or is added. */
  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<Tx>): Promise<Consumer> {
    const consumption: Consumption<Tx> = { spec, handle, consumers: new Map() };
    this.#running.add(consumption);
    const stop = async () => {
      this.#running.delete(consumption);
      const started = await Promise.allSettled(consumption.consumers.values());
      await Promise.all(started.map((c) => (c.status === 'fulfilled' ? c.value.stop() : undefined)));
    };
    try {
      await Promise.all([...this.#stamps.values()].filter((stamp) => stamp.opened).map((stamp) => this.#startOn(stamp, consumption)));
    } catch (error) {
      await stop().catch(() => undefined);
      throw error;
    }
    return { stop };
  }

  /** Every stamp's dead letters, each named with its tenant (ids `tenant/id`). */
  deadLetters(): StampDeadLetters {
    return new StampDeadLetters(() => [...this.#stamps.values()] as Stamp<unknown>[]);
  }

  /** Cancels a scheduled message in whichever stamp holds it. */
  async cancelScheduled(id: string): Promise<boolean> {
    const answers = await Promise.all(this.#upStamps().map((stamp) => stamp.backbone.cancelScheduled?.(id) ?? false));
    return answers.includes(true);
  }

  /** A recurring schedule's tick is claimed in the stamp of its transaction (one per tenant: see tickTenants). */
  async claimTick(name: string, definition: string, tick: number, tx: Tx): Promise<boolean> {
    const stamp = this.#ownerOf(tx) ?? this.#current(`Schedule ${name}`);
    return this.#ticksOf(stamp, name).claimTick!(name, definition, tick, tx);
  }

  /** The current tenant's last tick of schedule `name`, from its stamp. */
  async lastTick(name: string): Promise<{ readonly tick: number; readonly definition: string } | undefined> {
    const stamp = this.#current(`Schedule ${name}`);
    await this.#ready(stamp);
    return this.#ticksOf(stamp, name).lastTick!(name);
  }

  /**
   * A schedule fires each tick once per tenant whose stamp is up, in that stamp (a tick has no tenant of its
   * own, and each stamp keeps its own record of ticks). A stamp that is down at a tick misses it.
   */
  tickTenants(): readonly string[] {
    return this.#upStamps().map((stamp) => stamp.tenant);
  }

  #ticksOf(stamp: Stamp<Tx>, name: string): Backbone<Tx> {
    const { backbone } = stamp;
    if (backbone.claimTick === undefined || backbone.lastTick === undefined)
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Schedule ${name}: the ${backbone.name} backbone of tenant ${stamp.tenant}'s stamp cannot run recurring schedules`,
      );
    return backbone;
  }

  /** A request's answer goes to the stamp of its transaction, or of the delivery being handled. */
  async reply(requestId: string, reply: Reply, tx?: Tx): Promise<void> {
    const stamp = (tx === undefined ? undefined : this.#ownerOf(tx)) ?? this.#current(`Answering request ${requestId}`);
    if (stamp.backbone.reply === undefined)
      throw new TidingsError('INVALID_OPTIONS', `The ${stamp.backbone.name} backbone of tenant ${stamp.tenant}'s stamp cannot carry replies`);
    await stamp.backbone.reply(requestId, reply, tx);
  }

  /** Waits for the answer on every stamp (the request may name its tenant in its options only): the first one stands. */
  awaitReply(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    const waiting = this.#upStamps().filter((stamp) => stamp.backbone.awaitReply !== undefined);
    if (waiting.length === 0) return Promise.reject(new TidingsError('INVALID_OPTIONS', 'No stamp can carry replies'));
    const done = new AbortController();
    const stop = () => done.abort();
    signal.addEventListener('abort', stop, { once: true });
    const answers = waiting.map((stamp) => stamp.backbone.awaitReply!(requestId, done.signal, late));
    for (const answer of answers) answer.catch(() => undefined);
    return Promise.any(answers)
      .catch((error: AggregateError) => {
        throw error.errors[0];
      })
      .finally(() => {
        signal.removeEventListener('abort', stop);
        done.abort();
      });
  }

  /** Saga instances live in their tenant's stamp: loaded and saved in its transactions. */
  sagas(): SagaStore<Tx> {
    const storeOf = (stamp: Stamp<Tx>): SagaStore<Tx> => {
      const store = stamp.backbone.sagas?.();
      if (store === undefined)
        throw new TidingsError('INVALID_OPTIONS', `The ${stamp.backbone.name} backbone of tenant ${stamp.tenant}'s stamp keeps no saga state`);
      return store;
    };
    const byTx = (tx: Tx) => storeOf(this.#ownerOf(tx) ?? this.#current('A saga transition'));
    return {
      load: async (tx, saga, id) => byTx(tx).load(tx, saga, id),
      save: async (tx, saga, id, row, cause) => byTx(tx).save(tx, saga, id, row, cause),
      find: async (saga, id) => storeOf(this.#current(`Finding saga ${saga} ${id}`)).find(saga, id),
    };
  }

  /**
   * A service's record goes to every stamp that keeps one (each tenant's operators see the whole system), and
   * to stamps that open later.
   */
  contracts(): ContractRegistry | undefined {
    const registries = () => this.#upStamps().flatMap((stamp) => stamp.backbone.contracts?.() ?? []);
    return {
      record: async (service: ServiceRecord) => {
        this.#records.set(service.service, service);
        await Promise.all(registries().map((registry) => registry.record(service)));
      },
      services: async (): Promise<RecordedService[]> => (await registries()[0]?.services()) ?? [],
    };
  }

  /**
   * Every subscription's lag, held keys and dead letters summed over the stamps (the metrics' gauges are by
   * subscription); `statusByTenant()` has each stamp's. A stamp that is down counts nothing here and shows in `health()`.
   */
  async status(): Promise<BackboneStatus> {
    const sums = new Map<string, SubscriptionState>();
    for (const status of Object.values(await this.statusByTenant())) {
      for (const state of status.subscriptions) {
        const sum = sums.get(state.name);
        sums.set(
          state.name,
          sum === undefined
            ? { ...state, partitions: [] }
            : {
                name: state.name,
                lag: sum.lag + state.lag,
                oldestUnhandledAgeMs: oldest(sum.oldestUnhandledAgeMs, state.oldestUnhandledAgeMs),
                heldKeys: sum.heldKeys + state.heldKeys,
                deadLetters: sum.deadLetters + state.deadLetters,
                partitions: [],
              },
        );
      }
    }
    return { subscriptions: [...sums.values()] };
  }

  /** Each open stamp's status, by tenant. */
  async statusByTenant(): Promise<Record<string, BackboneStatus>> {
    const stamps = this.#upStamps().filter((stamp) => stamp.backbone.status !== undefined);
    const statuses = await Promise.allSettled(stamps.map((stamp) => stamp.backbone.status!()));
    const byTenant: Record<string, BackboneStatus> = {};
    stamps.forEach((stamp, i) => {
      const status = statuses[i]!;
      if (status.status === 'fulfilled') byTenant[stamp.tenant] = status.value;
    });
    return byTenant;
  }

  /**
   * Each stamp's checks, named `<tenant>: <check>`; a stamp that is down is one check, `<tenant>: stamp`, with
   * the reason. With `readiness: 'any'` (the default) a failing stamp's checks do not make the bus unready while
   * another stamp passes all of its own: a process taken out of service would hold up every tenant for one.
   * They stay listed, with `ok: true` and their detail saying what fails.
   */
  async health(): Promise<readonly HealthCheck[]> {
    const byStamp = await Promise.all(
      [...this.#stamps.values()].map(async (stamp): Promise<HealthCheck[]> => {
        if (!stamp.up) return [{ name: `${stamp.tenant}: stamp`, ok: false, detail: `not open: ${errorMessage(stamp.failure ?? 'opening')}` }];
        try {
          const own = (await stamp.backbone.health?.()) ?? [{ name: 'stamp', ok: true, detail: 'open' }];
          return own.map((check) => ({ ...check, name: `${stamp.tenant}: ${check.name}` }));
        } catch (error) {
          return [{ name: `${stamp.tenant}: stamp`, ok: false, detail: errorMessage(error) }];
        }
      }),
    );
    const anyHealthy = byStamp.some((checks) => checks.every((check) => check.ok));
    if (this.#settings.readiness === 'every' || !anyHealthy) return byStamp.flat();
    return byStamp
      .flat()
      .map((check) => (check.ok ? check : { ...check, ok: true, detail: `failing: ${check.detail} (this tenant alone waits; readiness: 'any')` }));
  }

  /** Closes every stamp (consumers must be stopped first) and stops opening the ones that are down. */
  async close(): Promise<void> {
    this.#closed = true;
    for (const timer of this.#reopening.values()) clearTimeout(timer);
    this.#reopening.clear();
    const stamps = [...this.#stamps.values()].filter((stamp) => stamp.opened);
    this.#opening = undefined;
    const closed = await Promise.allSettled(stamps.map((stamp) => stamp.backbone.close()));
    const failed = closed.find((c) => c.status === 'rejected') as PromiseRejectedResult | undefined;
    // Closed stamps open again with the next open().
    for (const stamp of stamps) stamp.closed();
    if (failed !== undefined) throw failed.reason;
  }

  // ---- routing ----------------------------------------------------------------------------------------

  #add(tenant: string): Stamp<Tx> {
    const make = () => {
      const backbone = this.#settings.backbone(tenant);
      if (this.#observer !== undefined) backbone.observe?.(this.#observer);
      return backbone;
    };
    const stamp = new Stamp(tenant, make, (opened) => this.#startAll(opened));
    this.#stamps.set(tenant, stamp);
    return stamp;
  }

  #tenantOf(message: Outgoing): string {
    const { tenant, topic, id } = message.envelope;
    if (tenant === undefined) {
      throw new TidingsError(
        'TENANT_REQUIRED',
        `Cannot publish ${topic} (message ${id}) without a tenant: with a backbone per tenant, the tenant chooses where the message is written. Publish it with { tenant } or inside bus.withTenant(tenant, fn)`,
        { ref: { id, topic } },
      );
    }
    return tenant;
  }

  #stampOf(tenant: string, what: string): Stamp<Tx> {
    const stamp = this.#stamps.get(tenant);
    if (stamp === undefined) {
      const known = this.tenants();
      throw new TidingsError(
        'TENANT_UNKNOWN',
        `${what}: tenant ${tenant} has no stamp (the stamps are ${known.length === 0 ? 'none yet: is the bus started?' : known.join(', ')}). Add it with backbone.addTenant('${tenant}'), or list it in tenantStamps({ tenants })`,
      );
    }
    return stamp;
  }

  /** The stamp of the code running now: `withTenant`'s tenant, the handled message's, or the delivery's stamp. */
  #current(what: string): Stamp<Tx> {
    const tenant = currentTenant();
    if (tenant !== undefined) return this.#stampOf(tenant, what);
    const delivering = this.#delivering.getStore();
    if (delivering !== undefined) return delivering;
    throw new TidingsError(
      'TENANT_REQUIRED',
      `${what} needs a tenant: with a backbone per tenant, each tenant's transactions run in its own stamp. Call it inside bus.withTenant(tenant, fn)`,
    );
  }

  /** The one stamp of messages written in a transaction the stamps did not open. */
  #single(messages: readonly Outgoing[]): Stamp<Tx> {
    const tenants = new Set(messages.map((message) => this.#tenantOf(message)));
    if (tenants.size > 1) {
      throw new TidingsError(
        'TENANT_FORBIDDEN',
        `Cannot publish messages of tenants ${[...tenants].join(', ')} in one transaction: each tenant's messages are written to its own stamp. Publish each tenant's in its own transaction`,
      );
    }
    const [tenant] = tenants;
    return this.#stampOf(tenant!, `Cannot publish ${messages[0]!.envelope.topic} (message ${messages[0]!.envelope.id})`);
  }

  #ownerOf(tx: Tx): Stamp<Tx> | undefined {
    return typeof tx === 'object' && tx !== null ? this.#owners.get(tx) : undefined;
  }

  #own(tx: Tx, stamp: Stamp<Tx>): void {
    if (typeof tx === 'object' && tx !== null) this.#owners.set(tx, stamp);
  }

  #upStamps(): Stamp<Tx>[] {
    return [...this.#stamps.values()].filter((stamp) => stamp.up);
  }

  /** Opens the stamp if it is not (a publish to a stamp that is down tries once more), naming its tenant if it cannot. */
  async #ready(stamp: Stamp<Tx>): Promise<void> {
    if (stamp.up) return;
    try {
      // A stamp that failed lately fails at once: a publish does not wait out a connect timeout per call.
      const recent = stamp.failedAt !== undefined && Date.now() - stamp.failedAt < this.#settings.reopenMs;
      if (recent) throw stamp.failure;
      await stamp.open();
    } catch (error) {
      throw new TidingsError(
        'BACKBONE_UNAVAILABLE',
        `The stamp of tenant ${stamp.tenant} is unavailable (${errorMessage(error)}); the other tenants' stamps are not affected. Try again once it is back`,
        { cause: error, retryable: true },
      );
    }
  }

  /** Opens a stamp that could not open again after `reopenMs`, until it opens; warns once per outage. */
  #reopenLater(stamp: Stamp<Tx>): void {
    if (this.#closed || this.#reopening.has(stamp)) return;
    if (!this.#down.has(stamp)) {
      this.#down.add(stamp);
      this.#settings.warn(
        `tenantStamps: the stamp of tenant ${stamp.tenant} could not open (${errorMessage(stamp.failure)}); its tenant waits while the others run, and it is tried again every ${this.#settings.reopenMs} ms`,
        stamp.failure,
      );
    }
    const timer = setTimeout(() => {
      this.#reopening.delete(stamp);
      if (this.#closed || stamp.up) return;
      stamp.open().catch(() => this.#reopenLater(stamp));
    }, this.#settings.reopenMs);
    timer.unref();
    this.#reopening.set(stamp, timer);
  }

  // ---- consuming --------------------------------------------------------------------------------------

  /**
   * A stamp opened: the listeners hear of it, then the running subscriptions start on it (a replica's tables
   * exist before its feed runs there), and the services' records are written to it.
   */
  async #startAll(stamp: Stamp<Tx>): Promise<void> {
    if (this.#down.delete(stamp)) this.#settings.warn(`tenantStamps: the stamp of tenant ${stamp.tenant} is open now`);
    await Promise.all([...this.#listeners].map((listener) => this.#tell(stamp, listener, 'opened')));
    const started = await Promise.allSettled([...this.#running].map((consumption) => this.#startOn(stamp, consumption)));
    for (const result of started) {
      if (result.status === 'rejected') this.#settings.warn(`tenantStamps: a subscription could not start on tenant ${stamp.tenant}'s stamp`, result.reason);
    }
    const registry = stamp.backbone.contracts?.();
    for (const record of this.#records.values()) {
      await registry
        ?.record(record)
        .catch((error: unknown) => this.#settings.warn(`tenantStamps: could not record service ${record.service} in tenant ${stamp.tenant}'s stamp`, error));
    }
  }

  /** Tells one listener of one stamp; what it throws is a warning, since the stamp serves its tenant anyway. */
  async #tell(stamp: Stamp<Tx>, listener: StampListener<Tx>, what: 'opened' | 'removed'): Promise<void> {
    try {
      await (what === 'opened' ? listener.opened?.(stamp.tenant, stamp.backbone) : listener.removed?.(stamp.tenant));
    } catch (error) {
      this.#settings.warn(`tenantStamps: a listener failed on tenant ${stamp.tenant}'s stamp being ${what} (${errorMessage(error)})`, error);
    }
  }

  /** Starts a consumption's consumer on a stamp, once. */
  #startOn(stamp: Stamp<Tx>, consumption: Consumption<Tx>): Promise<Consumer> {
    let consumer = consumption.consumers.get(stamp);
    if (consumer === undefined) {
      consumer = stamp.backbone.consume(consumption.spec, this.#handler(stamp, consumption.handle));
      consumption.consumers.set(stamp, consumer);
      consumer.catch(() => consumption.consumers.delete(stamp));
    }
    return consumer;
  }

  /**
   * Hands a stamp's deliveries to the core. A message without a tenant found in a stamp is its tenant's (what
   * its handler publishes then goes back to the same stamp); one of another tenant was written there by
   * something other than these stamps, and is dead-lettered rather than handled in the wrong tenant's stamp.
   */
  #handler(stamp: Stamp<Tx>, handle: DeliveryHandler<Tx>): DeliveryHandler<Tx> {
    const owners = this.#owners;
    return (delivery) => {
      const { tenant, id, topic } = delivery.envelope;
      if (tenant !== undefined && tenant !== stamp.tenant) {
        const message = `Message ${id} (${topic}) of tenant ${tenant} was found in tenant ${stamp.tenant}'s stamp: it was written there without tenantStamps, which writes each tenant's messages to its own stamp. Publish it again for its tenant, then drop this dead letter`;
        return Promise.resolve<DeliveryResult>({ outcome: 'dead-letter', reason: message, error: { name: 'TidingsError', code: 'TENANT_FORBIDDEN', message } });
      }
      const own: Delivery<Tx> = {
        envelope: tenant === undefined ? { ...delivery.envelope, tenant: stamp.tenant } : delivery.envelope,
        attempt: delivery.attempt,
        // Read when the handler uses it (a backbone may open it then): its stamp is known from then on.
        get tx() {
          const tx = delivery.tx;
          if (typeof tx === 'object' && tx !== null) owners.set(tx, stamp);
          return tx;
        },
      };
      return this.#delivering.run(stamp, () => handle(own));
    };
  }
}

function oldest(a: number | null | undefined, b: number | null | undefined): number | null | undefined {
  if (a === undefined || b === undefined) return undefined;
  if (a === null) return b;
  if (b === null) return a;
  return Math.max(a, b);
}
