import type { Channel, Message } from 'amqplib';

/**
 * The acknowledgements of one channel, sent together. amqplib writes every frame to the socket on its own,
 * and a drain acknowledging one message per frame spent a fifth of its time in those writes. Handlers
 * finish out of order (per-key lanes), so acknowledgements wait for the end of the current turn of the event
 * loop; then the finished messages that head the channel's outstanding deliveries go in one
 * `ack(..., allUpTo)` frame, and the others one frame each, so none keeps its prefetch slot longer.
 * Delivery tags count up per channel: a channel's deliveries are registered in the order they arrive.
 */
export class ChannelAcks {
  /** Delivered on this channel and not yet acknowledged to the broker, in tag order. */
  readonly #outstanding = new Set<number>();
  /** Finished, to be acknowledged at the next flush. */
  readonly #finished = new Map<number, Message>();
  #scheduled: NodeJS.Immediate | undefined;

  constructor(private readonly channel: Channel) {}

  delivered(message: Message): void {
    this.#outstanding.add(message.fields.deliveryTag);
  }

  ack(message: Message): void {
    this.#finished.set(message.fields.deliveryTag, message);
    this.#scheduled ??= setImmediate(() => {
      try {
        this.flush();
      } catch {
        // The channel closed: its consumer hears of it (close event) and the broker redelivers.
      }
    });
  }

  /**
   * Sends what is finished. Throws if the channel is closed; its unacknowledged messages then come again,
   * as they would have had each been acknowledged alone just before the channel closed.
   */
  flush(): void {
    clearImmediate(this.#scheduled);
    this.#scheduled = undefined;
    if (this.#finished.size === 0) return;
    let upTo: Message | undefined;
    let heading = 0;
    for (const tag of this.#outstanding) {
      const message = this.#finished.get(tag);
      if (message === undefined) break;
      upTo = message;
      heading++;
      this.#outstanding.delete(tag);
      this.#finished.delete(tag);
    }
    const rest = [...this.#finished.values()];
    this.#finished.clear();
    if (upTo !== undefined) this.channel.ack(upTo, heading > 1);
    for (const message of rest) {
      this.#outstanding.delete(message.fields.deliveryTag);
      this.channel.ack(message);
    }
  }

  /** The channel is gone: nothing more is sent on it. */
  discard(): void {
    clearImmediate(this.#scheduled);
    this.#scheduled = undefined;
    this.#finished.clear();
    this.#outstanding.clear();
  }
}
