/**
 * The partition's holds queue, consumed on the reader's channel (holds.ts): declared and consumed the first
 * time a channel needs it (to take the partition over, or before writing a hold record), once per channel.
 */
import type { ConfirmChannel, ConsumeMessage } from 'amqplib';
import { declareHolds } from '../topology.ts';
import { received, type ReaderState } from './state.ts';

export class HoldsQueue {
  readonly #state: ReaderState;
  readonly #onMessage: (message: ConsumeMessage, generation: number) => void;
  /** The holds queue consumed on the current channel (declared first), once it is needed. */
  #consuming: Promise<void> | undefined;

  constructor(state: ReaderState, onMessage: (message: ConsumeMessage, generation: number) => void) {
    this.#state = state;
    this.#onMessage = onMessage;
  }

  /** Whether the current channel consumes the holds queue (so it is declared). */
  get consumed(): boolean {
    return this.#consuming !== undefined;
  }

  /** Consumes the holds queue on this channel (declaring it first), once per channel. */
  read(channel: ConfirmChannel, generation: number): Promise<void> {
    this.#consuming ??= (async () => {
      const { host, index, holdsQueue } = this.#state;
      const acks = this.#state.acks!;
      await declareHolds(channel, host.names, host.settings, host.spec.name, index);
      // Hold records stay unacknowledged while their keys are held: no prefetch limit on them.
      await channel.prefetch(0, false);
      await channel.consume(holdsQueue, (message) => received(channel, acks, message, (delivered) => this.#onMessage(delivered, generation)), {
        noAck: false,
      });
    })();
    return this.#consuming;
  }

  /** The channel is gone. */
  reset(): void {
    this.#consuming = undefined;
  }
}
