/**
 * The message a handler is handling, kept for the length of its handler (AsyncLocalStorage), so that what the
 * handler publishes joins its transaction and inherits its correlation and tenant (outgoing.ts, tenant.ts).
 * Apart from handler.ts, which runs handlers in it, so tenant.ts can read it without an import circle.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { Message } from './envelope.ts';

/** The message being handled, so `bus.publish` inside a handler can inherit from it and use its transaction. */
export interface HandlerScope {
  readonly message: Message<unknown>;
  /** Its `tx` is read only when the handler publishes: a backbone may make it on first use. */
  readonly delivery: { readonly tx: unknown };
  /** Its subscription lets handlers publish for other tenants than the message's (core/tenant.ts). */
  readonly crossTenant?: boolean;
}

export const handlerScope = new AsyncLocalStorage<HandlerScope>();
