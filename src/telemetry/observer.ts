/**
 * What the bus hands its backbone (`Backbone.observe`), in types that need no OpenTelemetry package: the
 * outbox relay's spans, the receive spans of the backbone's readers, and the events only a backbone sees (a
 * lost lease, a lost or restored connection).
 */
import type { Envelope } from '../core/envelope.ts';
import type { BusEvents } from './events.ts';

/** What a hop writes into the envelope it passes on (W3C Trace Context). */
export interface TraceHeaders {
  readonly traceparent: string;
  readonly tracestate: string | undefined;
}

/** A span in progress around a publish or a relay: the headers to write into the envelopes, and its end. */
export interface HopSpan {
  /** Undefined when there is nothing to propagate (no sampled or parent context). */
  readonly headers: TraceHeaders | undefined;
  end(error?: unknown): void;
}

/** The events a backbone may emit. */
export type BackboneEventName = 'lease:lost' | 'connection:lost' | 'connection:restored';

/** A message a reader took, as its receive span links to it: an Envelope fits, and so does a PostgreSQL log row. */
export interface ReceivedMessage {
  readonly id: string;
  readonly topic: string;
  readonly traceparent?: string | null | undefined;
  readonly tracestate?: string | null | undefined;
}

/** Ends one read: records its receive span if it brought messages (`partition` when they all came from one). */
export type Received = (messages: readonly ReceivedMessage[], partition?: number) => void;

export interface BackboneObserver {
  /** The relay's span for handing `envelope` to `broker`; undefined while tracing is off. */
  relay(envelope: Envelope, broker: string): HopSpan | undefined;
  /**
   * Times one read of `subscription` on `system` (a PostgreSQL batch, a NATS pull, what RabbitMQ delivered in
   * one turn, what a memory worker took): call what it returns once the messages are in. Undefined while
   * tracing is off, so a reader pays one call per read and builds nothing.
   */
  receiving(system: string, subscription: string): Received | undefined;
  emit<E extends BackboneEventName>(name: E, event: BusEvents[E]): void;
}
