/**
 * Receive spans for a backbone that is delivered to rather than reading (RabbitMQ pushes each message into
 * the consumer's callback): what arrives in one turn of the event loop, one read of the socket, counts as one
 * read, so one receive span holds it, not one span per message. Proven by test/tracing.brokers.test.ts.
 */
import type { Received, ReceivedMessage } from './observer.ts';

export class Arrivals {
  readonly #start: () => Received | undefined;
  readonly #partition: number | undefined;
  #received: Received | undefined;
  #batch: ReceivedMessage[] = [];

  /** `start` opens a read (`BackboneObserver.receiving`), undefined while tracing is off. */
  constructor(start: () => Received | undefined, partition?: number) {
    this.#start = start;
    this.#partition = partition;
  }

  /** A message arrived: it joins this turn's receive span, which ends once the turn's deliveries are in. */
  add(message: ReceivedMessage): void {
    if (this.#received === undefined) {
      this.#received = this.#start();
      if (this.#received === undefined) return;
      queueMicrotask(this.#end);
    }
    this.#batch.push(message);
  }

  readonly #end = (): void => {
    const received = this.#received!;
    const batch = this.#batch;
    this.#received = undefined;
    this.#batch = [];
    received(batch, this.#partition);
  };
}
