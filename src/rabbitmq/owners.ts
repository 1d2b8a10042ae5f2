/**
 * Commands with one owner on RabbitMQ. A command is handled by one subscription: the first to start with a
 * handler for it records itself as the owner, and any other subscription that later starts with one is
 * refused (SUBSCRIPTION_CONFLICT naming both) before it declares a queue, so `send` (routed by the
 * command's exchange to every bound queue) reaches the owner's queues only. PostgreSQL keeps the same rule
 * in its subscriptions table (postgres/consume/leases.ts); RabbitMQ has no table, and AMQP cannot list an
 * exchange's bindings, so the owner is written down in the broker:
 *
 *   <prefix><command>:owner        classic durable queue holding one message: the owning subscription's name
 *   <prefix><command>:owner-lock   classic durable queue that stays empty; whoever holds an exclusive consumer
 *                                  on it may read and write the owner (a second exclusive consumer is refused
 *                                  with 403 ACCESS_REFUSED, and the lock goes with the channel, so a process
 *                                  killed while claiming leaves no lock behind)
 *
 * Topic names cannot contain `:`, and no subscription queue ends in `:owner`, so the names never collide.
 * The owner stays recorded after its processes stop, as on PostgreSQL: a subscription gone for good is
 * released by deleting its `:owner` queue. (Test: the conformance suite's *a command has one owner*.)
 */
import type { ConfirmChannel } from 'amqplib';
import type { SubscriptionSpec } from '../core/backbone.ts';
import { TidingsError } from '../core/errors.ts';
import { sleep } from '../core/sleep.ts';
import type { Link } from './connection.ts';
import type { Names } from './topology.ts';

/** AMQP reply code: the exclusive consumer on the lock is another channel's. */
const ACCESS_REFUSED = 403;
/** Wait between attempts at the lock while another process claims the same command (a claim takes a few ms). */
const LOCK_RETRY_MS = 20;

export class CommandOwners {
  readonly #link: Link;
  readonly #names: Names;
  /** Claims of one backbone run one after another: its channels share a connection, the lock is per channel only. */
  #previous: Promise<unknown> = Promise.resolve();

  constructor(link: Link, names: Names) {
    this.#link = link;
    this.#names = names;
  }

  ownerQueue(command: string): string {
    return `${this.#names.prefix}${command}:owner`;
  }

  lockQueue(command: string): string {
    return `${this.#names.prefix}${command}:owner-lock`;
  }

  /** Records `spec` as the owner of each of its commands, or refuses it if another subscription owns one. */
  claim(spec: SubscriptionSpec, deadline: number): Promise<void> {
    const run = this.#previous.then(async () => {
      for (const command of spec.commands ?? []) await this.#claim(command, spec.name, deadline);
    });
    this.#previous = run.catch(() => undefined);
    return run;
  }

  async #claim(command: string, subscription: string, deadline: number): Promise<void> {
    for (;;) {
      const channel = await this.#link.confirmChannel(deadline);
      try {
        if (!(await this.#lock(channel, command))) {
          if (Date.now() > deadline) {
            throw new TidingsError(
              'BACKBONE_UNAVAILABLE',
              `Subscription ${subscription}: could not take the lock ${this.lockQueue(command)} to record the owner of command ${command} before the connect timeout; another process holds it`,
              { retryable: true },
            );
          }
          await sleep(LOCK_RETRY_MS + Math.random() * LOCK_RETRY_MS, this.#link.signal);
          continue;
        }
        const owner = await this.#readOrWrite(channel, command, subscription);
        if (owner !== subscription) {
          throw new TidingsError(
            'SUBSCRIPTION_CONFLICT',
            `Command ${command} is handled by subscription ${owner} already; subscription ${subscription} cannot take it too: a command has one owner (send delivers it once). Handle it in ${owner}, or, if that subscription is gone for good, delete RabbitMQ queue ${this.ownerQueue(command)} (its owner record)`,
            { ref: { topic: command } },
          );
        }
        return;
      } finally {
        // Closing the channel ends the exclusive consumer: the lock is free again.
        await channel.close().catch(() => undefined);
      }
    }
  }

  /** True once this channel holds the exclusive consumer on the command's lock; false if another channel does. */
  async #lock(channel: ConfirmChannel, command: string): Promise<boolean> {
    const lock = this.lockQueue(command);
    await channel.assertQueue(lock, { durable: true, arguments: { 'x-queue-type': 'classic' } });
    try {
      await channel.consume(lock, () => undefined, { exclusive: true, noAck: true });
      return true;
    } catch (error) {
      if ((error as { code?: unknown }).code === ACCESS_REFUSED) return false;
      throw error;
    }
  }

  /**
   * The owner recorded, or `subscription` once written as the owner. Read under the lock with `basic.get`,
   * which says empty for sure (a consumer could not). The record read is published again before it is
   * acknowledged, so the queue holds a ready copy at every moment: a crash in between leaves two copies of
   * the same name, never none.
   */
  async #readOrWrite(channel: ConfirmChannel, command: string, subscription: string): Promise<string> {
    const queue = this.ownerQueue(command);
    await channel.assertQueue(queue, { durable: true, arguments: { 'x-queue-type': 'classic' } });
    const record = await channel.get(queue, { noAck: false });
    const owner = record === false ? subscription : record.content.toString('utf8');
    await new Promise<void>((resolve, reject) => {
      channel.sendToQueue(queue, Buffer.from(owner), { persistent: true, contentType: 'text/plain' }, (error: unknown) => (error ? reject(error) : resolve()));
    });
    if (record !== false) channel.ack(record);
    return owner;
  }
}
