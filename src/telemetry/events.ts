/**
 * Typed events for what operators need to see: a retry, a dead letter, a message that fails its schema on
 * receive, a lost lease, a lost or restored connection. Listeners are called after the fact and apart from
 * the work: one that throws or rejects is reported as a warning and cannot break the worker (graphile/
 * worker's events work this way). Proven by test/observability.memory.test.ts.
 */
import type { ErrorRecord } from '../core/errors.ts';

/** What every message event names. */
export interface MessageEvent {
  readonly subscription: string;
  readonly topic: string;
  readonly id: string;
  readonly key: string;
  /** 1 for the first attempt. */
  readonly attempt: number;
}

export interface BusEvents {
  /** An attempt failed and the message will be tried again, at once (`delayMs` 0) or later (its key is held). */
  'message:retry': MessageEvent & { readonly delayMs: number; readonly error: ErrorRecord };
  /** The message went to the subscription's dead letters. */
  'message:dead-letter': MessageEvent & { readonly reason: string; readonly error: ErrorRecord };
  /**
   * The message could not be read as its contract says (its data fails the schema, it cannot be decoded, or it
   * breaks a limit) and went to dead letters without reaching the handler. Also emitted as `message:dead-letter`.
   */
  'message:invalid': MessageEvent & { readonly reason: string; readonly error: ErrorRecord };
  /** A worker lost a partition's lease (another took it over, or it could not renew it in time). */
  'lease:lost': { readonly subscription: string; readonly backbone: string; readonly detail: string };
  /** A backbone lost its connection; it reconnects by itself. */
  'connection:lost': { readonly backbone: string; readonly detail: string; readonly error?: unknown };
  /** A backbone's connection is back. */
  'connection:restored': { readonly backbone: string; readonly detail: string };
}

export type BusEventName = keyof BusEvents;
export type BusEventListener<E extends BusEventName> = (event: BusEvents[E]) => void | Promise<void>;

/** The listeners of one bus. */
export class BusEventEmitter {
  readonly #listeners = new Map<BusEventName, Set<(event: never) => void | Promise<void>>>();

  constructor(private readonly warn: (message: string, error?: unknown) => void) {}

  on<E extends BusEventName>(name: E, listener: BusEventListener<E>): () => void {
    let set = this.#listeners.get(name);
    if (set === undefined) {
      set = new Set();
      this.#listeners.set(name, set);
    }
    set.add(listener as (event: never) => void);
    return () => set.delete(listener as (event: never) => void);
  }

  /** Whether anyone listens to `name`: the event is not even built otherwise. */
  has(name: BusEventName): boolean {
    return (this.#listeners.get(name)?.size ?? 0) > 0;
  }

  emit<E extends BusEventName>(name: E, event: BusEvents[E]): void {
    const set = this.#listeners.get(name);
    if (set === undefined) return;
    for (const listener of set) {
      try {
        const result = (listener as BusEventListener<E>)(event);
        if (result instanceof Promise) result.catch((error: unknown) => this.warn(`A listener of ${name} failed; the bus goes on`, error));
      } catch (error) {
        this.warn(`A listener of ${name} threw; the bus goes on`, error);
      }
    }
  }
}
