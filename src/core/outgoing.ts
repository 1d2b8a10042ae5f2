/**
 * A publish on its way out of the bus: what it inherits inside a handler (transaction, correlation, tenant,
 * trace), when it is due, each message validated and keyed, then serialised into its envelope, and handed to
 * the backbone (in chunks when the backbone streams them). Kept apart from publish.ts: that file is the
 * vocabulary (what a publish takes and returns) that handlers, schedules and users read, with no imports;
 * this one is the machinery, with the limits, tenancy and telemetry it needs.
 */
import type { Backbone, Outgoing } from './backbone.ts';
import type { Clock } from './clock.ts';
import { validateNow, type AnyContract } from './contract.ts';
import { keyHash, newId, type Envelope, type Message } from './envelope.ts';
import { TidingsError } from './errors.ts';
import { attributeProblem, bytesOver, dataProblem, messageLimits } from './limits.ts';
import type { PublishedMessage, PublishOptions } from './publish.ts';
import { handlerScope } from './scope.ts';
import { tenantOfPublish } from './tenant.ts';
import type { BusTelemetry } from '../telemetry/telemetry.ts';

/** What the publisher needs of its bus. */
interface PublisherSettings<Tx> {
  /** The CloudEvents `source` of every message: `tidings://<service>`. */
  readonly service: string;
  readonly backbone: Backbone<Tx>;
  /** The clock `delayMs` counts from. */
  readonly clock: Clock;
  readonly maxPayloadBytes: number;
  readonly requireTenant: boolean;
  readonly telemetry: BusTelemetry;
  /** Opens the backbone: called once every message is checked, so bad input fails before any connection. */
  readonly open: () => Promise<void>;
}

/** The bus's publishing side: `bus.publish`, `publishMany`, `send`, and what handlers and schedules publish. */
export class Publisher<Tx> {
  /** Messages published per topic (in a transaction: counted when written, before the commit). */
  readonly counts: Record<string, number> = {};
  readonly #settings: PublisherSettings<Tx>;

  constructor(settings: PublisherSettings<Tx>) {
    this.#settings = settings;
  }

  async publish(contract: AnyContract, items: readonly unknown[], options: PublishOptions): Promise<PublishedMessage[]> {
    const { backbone, telemetry } = this.#settings;
    const scope = handlerScope.getStore();
    // Inside a handler, a publish joins the handler's transaction and carries its correlation, so it is
    // delivered iff the handled message is acknowledged.
    const tenant = tenantOfPublish({ contract, named: options.tenant, handler: scope, required: this.#settings.requireTenant });
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
    const dueAt = dueTime(contract, effective, this.#settings.clock.now());
    if (dueAt !== undefined && backbone.cancelScheduled === undefined) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `Cannot publish ${contract.name} for later: the ${backbone.name} backbone cannot schedule delivery${backbone.name === 'postgres' || backbone.name === 'memory' ? '' : ' without an outbox database (give it outbox: postgres({ url }))'}`,
      );
    }
    // Every message is validated before any is written or serialised: a bad one stops them all.
    const checked: Checked[] = [];
    for (const data of items) {
      const item = tooDeep(contract, () => check(contract, data, effective, items.length === 1));
      checked.push(item instanceof Promise ? await item : item);
    }
    await this.#settings.open();
    // A tenant's quota counts what callers publish for it; what its handlers publish follows from messages it admitted.
    if (tenant !== undefined && scope === undefined) await backbone.admit?.(tenant, contract, checked.length, effective.tx as Tx | undefined);
    // With tracing, the publish's span is the messages' creation context: their traceparent names it.
    const span = telemetry.publishing(contract.topic, checked.length, checked[0]?.id, effective, scope?.delivery);
    const traced = span?.headers === undefined ? effective : { ...effective, ...span.headers };
    const seal = (item: Checked) => tooDeep(contract, () => this.#seal(contract, item, traced, time, dueAt));
    const tx = effective.tx as Tx | undefined;
    const publishChunks = backbone.publishChunks?.bind(backbone);
    try {
      if (publishChunks !== undefined && checked.length > STREAM_CHUNK && dueAt === undefined) {
        const chunks = chunked(checked, STREAM_CHUNK, seal);
        await (tx !== undefined ? publishChunks(chunks, tx) : backbone.transaction((own) => publishChunks(chunks, own)));
      } else {
        await backbone.publish(checked.map(seal), tx);
      }
    } catch (error) {
      span?.end(error);
      throw error;
    }
    span?.end();
    this.counts[contract.topic] = (this.counts[contract.topic] ?? 0) + checked.length;
    telemetry.published(contract.topic, checked.length);
    if (dueAt === undefined) return checked.map(({ id, key }) => ({ id, topic: contract.topic, key }));
    const deliverAt = new Date(dueAt);
    return checked.map(({ id, key }) => ({ id, topic: contract.topic, key, deliverAt }));
  }

  /** Serialises a checked message into its envelope. */
  #seal(contract: AnyContract, { id, key, data }: Checked, options: PublishOptions, time: string, dueAt: number | undefined): Outgoing {
    const { maxPayloadBytes } = this.#settings;
    const json = JSON.stringify(data);
    if (json === undefined) {
      throw new TidingsError('INVALID_PAYLOAD', `Payload for ${contract.name} cannot be serialised as JSON`, { ref: { id, topic: contract.topic, key } });
    }
    // Length in UTF-16 units is at most the UTF-8 byte length for ASCII; measure bytes only near the limit.
    if (json.length * 3 > maxPayloadBytes && Buffer.byteLength(json) > maxPayloadBytes) {
      throw new TidingsError(
        'PAYLOAD_TOO_LARGE',
        `Payload for ${contract.name} is ${Buffer.byteLength(json)} bytes, over the limit of ${maxPayloadBytes} (maxPayloadBytes); store large data elsewhere and publish a reference to it`,
        { ref: { id, topic: contract.topic, key } },
      );
    }
    const envelope: Envelope = {
      specversion: '1.0',
      id,
      source: `tidings://${this.#settings.service}`,
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

/** What a message published while handling `parent` inherits from it. */
export function inherit(parent: Message<unknown>): PublishOptions {
  return {
    correlationId: parent.correlationId,
    causationId: parent.id,
    ...(parent.tenant === undefined ? {} : { tenant: parent.tenant }),
    ...(parent.traceparent === undefined ? {} : { traceparent: parent.traceparent }),
    ...(parent.tracestate === undefined ? {} : { tracestate: parent.tracestate }),
  };
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

/** Validates one message's data and finds its key. */
function check(contract: AnyContract, data: unknown, options: PublishOptions, single: boolean): Checked | Promise<Checked> {
  const id = single && options.id !== undefined ? options.id : newId();
  const parsed = validateNow(contract, data, { id, topic: contract.topic });
  return parsed instanceof Promise ? parsed.then((value) => keyed(contract, id, data, value, options)) : keyed(contract, id, data, parsed, options);
}

/** Finds a validated message's key. */
function keyed(contract: AnyContract, id: string, data: unknown, parsed: unknown, options: PublishOptions): Checked {
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

function limitError(contract: AnyContract, problem: string, ref: { id?: string; topic?: string }): TidingsError {
  return new TidingsError('LIMIT_EXCEEDED', `Cannot publish ${contract.name}: ${problem}`, { ref: { topic: contract.topic, ...ref } });
}
