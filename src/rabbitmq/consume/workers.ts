/**
 * The live workers of one subscription, as this process sees them, and which partitions each reads.
 *
 * Every worker (a subscription in one bus) announces itself on the subscription's workers exchange every
 * `workerHeartbeatMs`: an id, a name for people (host and pid) and the topics it handles. It hears the others
 * through an exclusive queue of its own; one not heard for `workerTimeoutMs` is gone (killed, cut off). A
 * worker that hears a newcomer answers at once, so a newcomer knows its peers within a round trip, and one
 * that stops says so, so that its partitions move at once.
 *
 * The subscription's topics are those its workers have handlers for (README, "Adding or removing a handler
 * on a live subscription"): every topic a live worker handles, and every topic its newest worker handles
 * (the last one started, alive or not: ids are time-ordered, and each worker remembers the newest it heard
 * of). The partitions go to the workers that handle every topic of the subscription, in turn by id: each
 * takes partitions / workers of them, give or take one, as PostgreSQL's leases share them. A worker that
 * lacks a topic (an old version during a rolling deploy that adds a handler, a new one during a deploy that
 * removes one) reads no partition: it would meet messages it has no handler for, and could neither
 * acknowledge them nor let later messages of their key overtake them.
 *
 * Two workers whose views differ for a moment may both read a partition: the queue's single active
 * consumer lets one of them at a time, so a view only decides who shares the work, never the order.
 * (Tests: workers.rabbitmq.)
 */
import { hostname } from 'node:os';
import type { ConfirmChannel } from 'amqplib';
import { newId } from '../../core/envelope.ts';
import { sleep } from '../../core/sleep.ts';
import type { Link } from '../connection.ts';
import type { Names } from '../topology.ts';

interface WorkerInfo {
  readonly id: string;
  /** For people: `host/pid/connection name`. */
  readonly name: string;
  /** Sorted. */
  readonly topics: readonly string[];
}

interface WorkersSettings {
  readonly heartbeatMs: number;
  readonly timeoutMs: number;
  readonly reconnectMinMs: number;
  readonly reconnectMaxMs: number;
  readonly connectionName: string;
  readonly warn: (message: string, error?: unknown) => void;
}

/** The subscription these workers read, the topics this one handles, and what to call when the partitions it is given change. */
interface WorkersOf {
  readonly name: string;
  readonly topics: readonly string[];
  readonly onChange: () => void;
}

interface Announcement {
  readonly id: string;
  readonly name: string;
  readonly topics: readonly string[];
  readonly leaving?: boolean;
}

/**
 * Which partitions each worker reads: the workers that handle every one of `topics` (by default, every topic
 * some worker handles) take them in turn, by id. Workers that lack a topic get none; if no worker handles
 * them all, nobody reads.
 */
export function assignPartitions(workers: readonly WorkerInfo[], partitions: number, topics = topicsOf(workers)): Map<string, number[]> {
  const capable = ableWorkers(workers, topics);
  const assigned = new Map<string, number[]>(workers.map((worker) => [worker.id, []]));
  for (let partition = 0; partition < partitions && capable.length > 0; partition++) assigned.get(capable[partition % capable.length]!.id)!.push(partition);
  return assigned;
}

/** The workers that handle every one of `topics`, by id. */
function ableWorkers(workers: readonly WorkerInfo[], topics: readonly string[]): WorkerInfo[] {
  return workers.filter((worker) => topics.every((topic) => worker.topics.includes(topic))).sort((a, b) => a.id.localeCompare(b.id));
}

function topicsOf(workers: readonly WorkerInfo[]): string[] {
  return [...new Set(workers.flatMap((worker) => worker.topics))].sort();
}

export class Workers {
  readonly self: WorkerInfo;
  readonly #link: Link;
  readonly #names: Names;
  readonly #subscription: string;
  readonly #settings: WorkersSettings;
  readonly #onChange: () => void;
  /** The others, with when each was last heard (ms since epoch). */
  readonly #peers = new Map<string, { info: WorkerInfo; heardAt: number }>();
  /** The last worker started that this one heard of (itself, at first), alive or not. */
  #newest: WorkerInfo;
  #channel: ConfirmChannel | undefined;
  /** Since when this worker has been heard by the others (its announcement went out on this channel). */
  #joinedAt = Number.POSITIVE_INFINITY;
  #timer: NodeJS.Timeout | undefined;
  #stopping = false;
  #reconnecting: Promise<void> | undefined;
  #disagreement = '';

  constructor(link: Link, names: Names, subscription: WorkersOf, settings: WorkersSettings) {
    this.#link = link;
    this.#names = names;
    this.#subscription = subscription.name;
    this.#settings = settings;
    this.#onChange = subscription.onChange;
    const id = newId();
    this.self = { id, name: `${hostname()}/${process.pid}/${settings.connectionName}/${id.slice(-6)}`, topics: [...subscription.topics].sort() };
    this.#newest = this.self;
  }

  async start(deadline: number): Promise<void> {
    await this.#connect(deadline);
    this.#timer = setInterval(() => this.#tick(), this.#settings.heartbeatMs);
    this.#timer.unref();
  }

  /** Every live worker, this one included, by id. */
  live(): WorkerInfo[] {
    return [this.self, ...[...this.#peers.values()].map((peer) => peer.info)].sort((a, b) => a.id.localeCompare(b.id));
  }

  /** The subscription's topics: every topic a live worker handles, and every topic the newest worker handles. */
  topics(): string[] {
    return topicsOf([...this.live(), this.#newest]);
  }

  /** The newest worker, if it is gone. */
  get departedNewest(): WorkerInfo | undefined {
    return this.#newest.id === this.self.id || this.#peers.has(this.#newest.id) ? undefined : this.#newest;
  }

  /** The live workers that handle `topic`. */
  handling(topic: string): WorkerInfo[] {
    return this.live().filter((worker) => worker.topics.includes(topic));
  }

  /** True once every live worker has had a full timeout to announce itself to this one. */
  get settled(): boolean {
    return Date.now() - this.#joinedAt >= this.#settings.timeoutMs;
  }

  /** The partitions this worker reads, given what it knows. */
  assigned(partitions: number): number[] {
    return assignPartitions(this.live(), partitions, this.topics()).get(this.self.id) ?? [];
  }

  async #connect(deadline?: number): Promise<void> {
    const channel = await this.#link.confirmChannel(deadline);
    try {
      const exchange = this.#names.workers(this.#subscription);
      await channel.assertExchange(exchange, 'fanout', { durable: true });
      const { queue } = await channel.assertQueue('', { exclusive: true, autoDelete: true, durable: false, arguments: { 'x-queue-type': 'classic' } });
      await channel.bindQueue(queue, exchange, '');
      await channel.consume(queue, (message) => message !== null && this.#hear(message.content), { noAck: true });
      channel.once('close', () => this.#lost(channel));
      this.#channel = channel;
      this.#joinedAt = Date.now();
      this.#announce();
    } catch (error) {
      await channel.close().catch(() => undefined);
      throw error;
    }
  }

  #lost(channel: ConfirmChannel): void {
    if (this.#channel !== channel) return;
    this.#channel = undefined;
    this.#joinedAt = Number.POSITIVE_INFINITY;
    if (this.#stopping || this.#link.closed) return;
    this.#reconnecting ??= (async () => {
      for (let waitMs = this.#settings.reconnectMinMs; !this.#stopping && !this.#link.closed; waitMs = Math.min(waitMs * 2, this.#settings.reconnectMaxMs)) {
        try {
          await this.#connect();
          return;
        } catch (error) {
          if (this.#stopping || this.#link.closed) return;
          this.#settings.warn(`Subscription ${this.#subscription}: this worker could not announce itself to the others; retrying in ${waitMs} ms`, error);
          await sleep(waitMs, this.#link.signal);
        }
      }
    })().finally(() => {
      this.#reconnecting = undefined;
    });
  }

  #announce(leaving = false): void {
    if (this.#stopping && !leaving) return;
    const announcement: Announcement = { ...this.self, ...(leaving ? { leaving } : {}) };
    try {
      // Not confirmed: the next heartbeat repeats it. It expires with the worker's timeout, unread.
      this.#channel?.publish(this.#names.workers(this.#subscription), '', Buffer.from(JSON.stringify(announcement)), {
        contentType: 'application/json',
        expiration: String(this.#settings.timeoutMs),
      });
    } catch {
      // The channel closed: #lost announces again on the next one.
    }
  }

  #hear(content: Buffer): void {
    let heard: Announcement;
    try {
      heard = JSON.parse(content.toString('utf8')) as Announcement;
    } catch {
      return;
    }
    if (typeof heard.id !== 'string' || heard.id === this.self.id || !Array.isArray(heard.topics)) return;
    const known = this.#peers.get(heard.id);
    if (heard.leaving === true) {
      if (known !== undefined) {
        this.#peers.delete(heard.id);
        this.#changed();
      }
      return;
    }
    const info: WorkerInfo = { id: heard.id, name: String(heard.name), topics: [...heard.topics].map(String).sort() };
    this.#peers.set(heard.id, { info, heardAt: Date.now() });
    if (info.id > this.#newest.id) this.#newest = info;
    if (known === undefined) {
      // A newcomer: answer now rather than at the next heartbeat.
      this.#announce();
      this.#changed();
    } else if (known.info.topics.join('\n') !== info.topics.join('\n')) {
      this.#changed();
    }
  }

  #tick(): void {
    this.#announce();
    const now = Date.now();
    let gone = false;
    for (const [id, peer] of this.#peers) {
      if (now - peer.heardAt <= this.#settings.timeoutMs) continue;
      this.#peers.delete(id);
      gone = true;
    }
    if (gone) this.#changed();
  }

  #changed(): void {
    this.#warnOfDisagreement();
    this.#onChange();
  }

  /**
   * Says, once per change, that the live workers do not handle the same topics: the subscription, the topics,
   * and who lacks what. The usual cause is a rolling deploy that adds or removes a handler.
   */
  #warnOfDisagreement(): void {
    const live = this.live();
    const every = this.topics();
    const lacking = live.filter((worker) => worker.topics.length < every.length);
    const gone = this.departedNewest;
    const signature = lacking.length === 0 ? '' : `${live.map((worker) => `${worker.id}:${worker.topics.join(',')}`).join(' ')} gone:${gone?.id ?? ''}`;
    if (signature === this.#disagreement) return;
    this.#disagreement = signature;
    if (lacking.length === 0) return;
    const able = ableWorkers(live, every);
    const list = live.map((worker) => `${worker.name} handles ${worker.topics.join(', ')}`).join('; ');
    const newest = gone === undefined ? '' : ` (and the newest worker, ${gone.name}, gone now, handled ${gone.topics.join(', ')})`;
    const outcome =
      able.length === 0
        ? `no live worker handles all of ${every.join(', ')}, so no partition is read until one does`
        : `its partitions go only to the workers that handle all of them (${able.map((worker) => worker.name).join(', ')})`;
    this.#settings.warn(
      `Subscription ${this.#subscription}: its workers handle different topics (a rolling deploy?): ${list}${newest}. ${outcome[0]!.toUpperCase()}${outcome.slice(1)}; a worker never acknowledges, dead-letters or skips a message of a topic the subscription has and it cannot handle.`,
    );
  }

  /**
   * Says goodbye, so that the others take this worker's partitions over at once; called before its
   * partitions are released, so that the next readers are waiting when they are.
   */
  leave(): void {
    if (this.#stopping) return;
    this.#stopping = true;
    clearInterval(this.#timer);
    this.#announce(true);
  }

  /** Stops listening (after `leave()`). */
  async close(): Promise<void> {
    this.leave();
    await this.#reconnecting;
    const channel = this.#channel;
    this.#channel = undefined;
    await channel?.close().catch(() => undefined);
  }
}
