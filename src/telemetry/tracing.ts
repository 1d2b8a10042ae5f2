/**
 * Spans for the three hops of a message, after the OpenTelemetry messaging semantic conventions: `send
 * <topic>` (producer) when it is published, `relay <topic>` (producer) when the outbox relay hands it to a
 * broker, and `process <topic>` (consumer) for each attempt of a subscription. Each hop writes its span's
 * context into the envelope's `traceparent`, and the next hop's span is its child (and links to it), so one
 * trace runs from the publisher through the relay to every consumer, on every backbone.
 *
 * Beside them, `receive <subscription>` (consumer) for each read a backbone's reader makes: a span of its own
 * trace (a read serves many messages of many traces), linked to each message's creation context, as the
 * conventions say; the process spans link to the same contexts.
 *
 * The envelope's `traceparent` is read and written here in the W3C Trace Context format rather than through
 * the application's propagator: it is a CloudEvents attribute of the message (the distributed tracing
 * extension), whatever the application propagates on HTTP.
 */
import type { Context, Link, Span, SpanContext, Tracer } from '@opentelemetry/api';
import type { Delivery, DeliveryResult } from '../core/backbone.ts';
import type { Envelope } from '../core/envelope.ts';
import {
  ATTEMPT,
  BATCH_COUNT,
  CONSUMER_GROUP,
  CONVERSATION_ID,
  DESTINATION,
  ERROR_TYPE,
  MESSAGE_ID,
  MESSAGING_SYSTEM,
  OPERATION_NAME,
  OPERATION_TYPE,
  OUTCOME,
  PARTITION,
  SUBSCRIPTION,
} from './attributes.ts';
import type { HopSpan, ReceivedMessage, TraceHeaders } from './observer.ts';
import type { OtelApi } from './otel.ts';

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

export class Tracing {
  /** The process span of each attempt in flight, found again when its handler publishes (see `parentOf`). */
  readonly #processing = new WeakMap<object, Span>();

  constructor(
    private readonly api: OtelApi,
    private readonly tracer: Tracer,
    private readonly system: string,
  ) {}

  /**
   * Opens the `send` span of a publish of `count` messages of `topic` (`id` the first's). Its parent: the
   * process span of the handler publishing (found through its delivery, so this holds without a context
   * manager; it is itself the child of the handled message's traceparent), else the `traceparent` the caller
   * gave, else the active context.
   */
  publish(
    topic: string,
    count: number,
    id: string | undefined,
    given: { readonly traceparent?: string | undefined; readonly tracestate?: string | undefined },
    delivery: object | undefined,
  ): HopSpan {
    const { api } = this;
    const parent = this.#parent(given.traceparent, given.tracestate, delivery);
    const span = this.tracer.startSpan(
      `send ${topic}`,
      {
        kind: api.SpanKind.PRODUCER,
        attributes: {
          [MESSAGING_SYSTEM]: this.system,
          [OPERATION_TYPE]: 'send',
          [OPERATION_NAME]: 'send',
          [DESTINATION]: topic,
          ...(count === 1 && id !== undefined ? { [MESSAGE_ID]: id } : { [BATCH_COUNT]: count }),
        },
      },
      parent,
    );
    return this.#hop(span);
  }

  /** Opens the `relay` span of the outbox relay handing `envelope` to `broker`: a child of the publisher's span. */
  relay(envelope: Envelope, broker: string): HopSpan {
    const { api } = this;
    const parent = this.#extract(envelope.traceparent, envelope.tracestate);
    const span = this.tracer.startSpan(
      `relay ${envelope.topic}`,
      {
        kind: api.SpanKind.PRODUCER,
        attributes: {
          [MESSAGING_SYSTEM]: broker,
          [OPERATION_TYPE]: 'send',
          [OPERATION_NAME]: 'relay',
          [DESTINATION]: envelope.topic,
          [MESSAGE_ID]: envelope.id,
        },
        links: parent === undefined ? [] : [{ context: api.trace.getSpanContext(parent)! }],
      },
      parent ?? api.ROOT_CONTEXT,
    );
    return this.#hop(span);
  }

  /**
   * Runs one attempt of `subscription` in its `process` span: a child of the message's creation context
   * (its `traceparent`) and linked to it, active while the handler runs, so the handler's own spans and
   * its publishes are its children.
   */
  async process(subscription: string, delivery: Delivery<unknown>, run: () => Promise<DeliveryResult>): Promise<DeliveryResult> {
    const { api } = this;
    const { envelope } = delivery;
    const parent = this.#extract(envelope.traceparent, envelope.tracestate);
    const span = this.tracer.startSpan(
      `process ${envelope.topic}`,
      {
        kind: api.SpanKind.CONSUMER,
        attributes: {
          [MESSAGING_SYSTEM]: this.system,
          [OPERATION_TYPE]: 'process',
          [OPERATION_NAME]: 'process',
          [DESTINATION]: envelope.topic,
          [CONSUMER_GROUP]: subscription,
          [MESSAGE_ID]: envelope.id,
          [CONVERSATION_ID]: envelope.correlationid,
          [ATTEMPT]: delivery.attempt,
        },
        links: parent === undefined ? [] : [{ context: api.trace.getSpanContext(parent)! }],
      },
      parent ?? api.ROOT_CONTEXT,
    );
    this.#processing.set(delivery, span);
    try {
      const result = await api.context.with(api.trace.setSpan(parent ?? api.ROOT_CONTEXT, span), run);
      span.setAttribute(OUTCOME, result.outcome);
      if (result.outcome !== 'ack') {
        span.setAttribute(ERROR_TYPE, result.error.code ?? result.error.name ?? 'Error');
        span.setStatus({ code: api.SpanStatusCode.ERROR, message: result.outcome === 'dead-letter' ? result.reason : result.error.message });
      }
      return result;
    } catch (error) {
      span.recordException(error as Error);
      span.setStatus({ code: api.SpanStatusCode.ERROR, message: (error as Error)?.message });
      throw error;
    } finally {
      this.#processing.delete(delivery);
      span.end();
    }
  }

  /**
   * Records the `receive` span of one read of `subscription` that brought `messages` (at least one), from
   * `startedAt` to `endedAt` (epoch milliseconds, fractional: both from one clock, so the span's length is
   * the read's). A root span: the reader works for no one message's trace. Each message with a creation
   * context is a link, carrying its id; a batch of one topic names it as the destination.
   */
  receive(system: string, subscription: string, messages: readonly ReceivedMessage[], partition: number | undefined, startedAt: number, endedAt: number): void {
    const { api } = this;
    const links: Link[] = [];
    let topic: string | undefined = messages[0]!.topic;
    for (const message of messages) {
      if (message.topic !== topic) topic = undefined;
      const context = this.#remote(message.traceparent ?? undefined, message.tracestate ?? undefined);
      if (context !== undefined) links.push({ context, attributes: { [MESSAGE_ID]: message.id } });
    }
    const span = this.tracer.startSpan(
      `receive ${subscription}`,
      {
        kind: api.SpanKind.CONSUMER,
        startTime: startedAt,
        links,
        attributes: {
          [MESSAGING_SYSTEM]: system,
          [OPERATION_TYPE]: 'receive',
          [OPERATION_NAME]: 'receive',
          [CONSUMER_GROUP]: subscription,
          [SUBSCRIPTION]: subscription,
          [BATCH_COUNT]: messages.length,
          ...(topic === undefined ? {} : { [DESTINATION]: topic }),
          ...(messages.length === 1 ? { [MESSAGE_ID]: messages[0]!.id } : {}),
          ...(partition === undefined ? {} : { [PARTITION]: String(partition) }),
        },
      },
      api.ROOT_CONTEXT,
    );
    span.end(endedAt);
  }

  #hop(span: Span): HopSpan {
    const { api } = this;
    const context = span.spanContext();
    return {
      headers: api.isSpanContextValid(context) ? toHeaders(context) : undefined,
      end: (error?: unknown) => {
        if (error !== undefined) {
          span.recordException(error as Error);
          span.setStatus({ code: api.SpanStatusCode.ERROR, message: (error as Error)?.message });
          span.setAttribute(ERROR_TYPE, (error as { code?: string })?.code ?? (error as Error)?.name ?? 'Error');
        }
        span.end();
      },
    };
  }

  #parent(traceparent: string | undefined, tracestate: string | undefined, delivery: object | undefined): Context {
    const { api } = this;
    const processing = delivery === undefined ? undefined : this.#processing.get(delivery);
    if (processing !== undefined) return api.trace.setSpan(api.context.active(), processing);
    return this.#extract(traceparent, tracestate) ?? api.context.active();
  }

  /** The context `traceparent` names, as a remote parent; undefined if it names none (absent, or not W3C). */
  #extract(traceparent: string | undefined, tracestate: string | undefined): Context | undefined {
    const context = this.#remote(traceparent, tracestate);
    return context === undefined ? undefined : this.api.trace.setSpanContext(this.api.ROOT_CONTEXT, context);
  }

  /** The span context `traceparent` names; undefined if it names none. */
  #remote(traceparent: string | undefined, tracestate: string | undefined): SpanContext | undefined {
    if (traceparent === undefined) return undefined;
    const match = TRACEPARENT.exec(traceparent);
    if (match === null || match[1] === 'ff') return undefined;
    const { api } = this;
    const context: SpanContext = {
      traceId: match[2]!,
      spanId: match[3]!,
      traceFlags: Number.parseInt(match[4]!, 16) & 1,
      isRemote: true,
      ...(tracestate === undefined || tracestate === '' ? {} : { traceState: api.createTraceState(tracestate) }),
    };
    return api.isSpanContextValid(context) ? context : undefined;
  }
}

function toHeaders(context: SpanContext): TraceHeaders {
  const flags = (context.traceFlags & 0xff).toString(16).padStart(2, '0');
  const state = context.traceState?.serialize();
  return { traceparent: `00-${context.traceId}-${context.spanId}-${flags}`, tracestate: state === '' ? undefined : state };
}
