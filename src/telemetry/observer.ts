/**
 * What the bus hands its backbone (`Backbone.observe`), in types that need no OpenTelemetry package: the
 * outbox relay's spans, and the events only a backbone sees (a lost lease, a lost or restored connection).
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

export interface BackboneObserver {
  /** The relay's span for handing `envelope` to `broker`; undefined while tracing is off. */
  relay(envelope: Envelope, broker: string): HopSpan | undefined;
  emit<E extends BackboneEventName>(name: E, event: BusEvents[E]): void;
}
