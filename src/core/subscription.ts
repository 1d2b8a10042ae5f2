/**
 * A subscription (a named consumer group): its handlers, one per contract, and how it runs on the backbone.
 * Starting it builds the handler pipeline (core/handler.ts) and hands the backbone one delivery handler that
 * also counts each attempt's outcome, tells telemetry about failures, and answers a failed request at once.
 */
import type { Backbone, Consumer, Delivery, DeliveryHandler, DeliveryResult, SubscriptionSpec } from './backbone.ts';
import type { AnyContract, AnyRequestContract, DataOf, ReplyInputOf } from './contract.ts';
import { TidingsError } from './errors.ts';
import { createPipeline, type Handler, type Middleware, type ReplyHandler, type Route } from './handler.ts';
import type { ResolvedSubscribeOptions } from './options.ts';
import { inherit } from './outgoing.ts';
import type { PublishedMessage, PublishOptions } from './publish.ts';
import type { BusTelemetry } from '../telemetry/telemetry.ts';

export interface SubscriptionStats {
  /** Attempts that succeeded (the message was acknowledged, or will be with its batch). */
  handled: number;
  /** Attempts that failed and were scheduled to try again. */
  retried: number;
  /** Messages sent to dead letters. */
  deadLettered: number;
}

/** The handler a contract takes: one that returns the reply for a command that answers, else a plain one. */
export type HandlerFor<C, Tx> = C extends AnyRequestContract ? ReplyHandler<DataOf<C>, ReplyInputOf<C>, Tx> : Handler<DataOf<C>, Tx>;

/** A named consumer group: its handlers, one per contract, share order, retries and dead letters. */
export class Subscription<Tx> {
  readonly routes = new Map<string, Route<Tx>>();
  constructor(
    readonly name: string,
    readonly options: ResolvedSubscribeOptions,
    /** The bus it belongs to, told of each new handler (a subscription declared after start starts then). */
    private readonly bus: { changed(subscription: Subscription<Tx>): void },
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

/** What a subscription's consumer needs of its bus. */
interface ConsumerWiring<Tx> {
  readonly backbone: Backbone<Tx>;
  readonly telemetry: BusTelemetry;
  readonly warn: (message: string, error?: unknown) => void;
  /** The bus's middleware, read at each delivery: `bus.use` after start still applies. */
  readonly middleware: readonly Middleware<Tx>[];
  /** Aborted when the bus stops: handlers see it through `context.signal`. */
  readonly stopping: AbortSignal;
  /** This subscription's counts in `bus.stats()`. */
  readonly counts: SubscriptionStats;
  /** `bus.publish`, for what handlers publish through `context.publish`. */
  readonly publish: (contract: AnyContract, data: unknown, options: PublishOptions) => Promise<PublishedMessage>;
}

/** Starts `subscription`'s consumer on the backbone; resolves once its workers run. */
export function startConsumer<Tx>(subscription: Subscription<Tx>, wiring: ConsumerWiring<Tx>): Promise<Consumer> {
  const { backbone, telemetry, counts } = wiring;
  const { options } = subscription;
  const pipeline = createPipeline<Tx>({
    subscription: subscription.name,
    routes: subscription.routes,
    retry: options.retry,
    timeoutMs: options.timeoutMs,
    requireTenant: options.requireTenant,
    crossTenant: options.crossTenant,
    middleware: wiring.middleware,
    stopping: wiring.stopping,
    publish: (contract, data, publishOptions, parent, tx) => wiring.publish(contract, data, { tx, ...inherit(parent), ...publishOptions }),
    reply: async (request, reply, tx) => {
      await backbone.reply?.(request.id, { data: reply }, tx);
    },
  });
  const count = (delivery: Delivery<Tx>, result: DeliveryResult): DeliveryResult => {
    if (result.outcome === 'ack') {
      counts.handled++;
      return result;
    }
    if (result.outcome === 'retry') counts.retried++;
    else counts.deadLettered++;
    telemetry.failed(subscription.name, delivery, result);
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
      backbone.reply?.(delivery.envelope.id, { error: result.error }).catch((error: unknown) => {
        wiring.warn(`Subscription ${subscription.name}: could not answer request ${delivery.envelope.id} with its error; it waits for its timeout`, error);
      });
    }
    return result;
  };
  const handle: DeliveryHandler<Tx> = telemetry.consumer(
    subscription.name,
    requests.size === 0
      ? (delivery) => pipeline(delivery).then((result) => count(delivery, result))
      : (delivery) => pipeline(delivery).then((result) => count(delivery, answerFailure(delivery, result))),
  );
  return backbone.consume(consumeSpec(subscription), handle);
}

/** What the backbone is told of a subscription. */
function consumeSpec<Tx>(subscription: Subscription<Tx>): SubscriptionSpec {
  const { options, routes } = subscription;
  return {
    name: subscription.name,
    topics: [...routes.keys()],
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
    commands: [...routes.values()].filter((route) => route.contract.kind === 'command').map((route) => route.contract.topic),
  };
}
