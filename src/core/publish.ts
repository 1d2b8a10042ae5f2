/** What a publish takes besides the data, and what it returns: shared by the bus and handlers' `ctx.publish`. */
export interface PublishOptions {
  /** The caller's transaction: the message exists iff it commits (transactional outbox). */
  tx?: unknown;
  /** Overrides the contract's key function. */
  key?: string;
  /** CloudEvents `subject`: what the event is about, within the source. */
  subject?: string;
  tenant?: string;
  /** Defaults to a new UUIDv7. Give your own to make a retried publish recognisable downstream. */
  id?: string;
  correlationId?: string;
  causationId?: string;
  traceparent?: string;
  tracestate?: string;
  /**
   * Deliver at this time (a Date, an ISO string or epoch milliseconds), not now: the message enters its
   * key's order when it is due. A time in the past delivers now. Cancel it with `bus.cancelScheduled(id)`.
   */
  deliverAt?: Date | string | number;
  /** Deliver this many milliseconds from now (instead of `deliverAt`). */
  delayMs?: number;
}

export interface PublishedMessage {
  readonly id: string;
  readonly topic: string;
  readonly key: string;
  /** When it is due, if it was scheduled for later (`deliverAt`, `delayMs`); `bus.cancelScheduled(id)` cancels it until then. */
  readonly deliverAt?: Date;
}

/** What `bus.request` takes: a publish's options, and how long to wait for the reply. */
export interface RequestOptions extends Omit<PublishOptions, 'tx' | 'deliverAt' | 'delayMs'> {
  /** Reject with REQUEST_TIMEOUT after this long (default `busDefaults.requestTimeoutMs`). */
  timeoutMs?: number;
}
