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
}

export interface PublishedMessage {
  readonly id: string;
  readonly topic: string;
  readonly key: string;
}
