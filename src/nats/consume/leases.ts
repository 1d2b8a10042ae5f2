/**
 * The buckets this worker holds: each heartbeat renews their leases (compare-and-set on their revision),
 * reads the live workers and takes or gives up buckets to hold its share. Taking a bucket loads its durable
 * holds before anything of it runs; giving one up hands what is left back to JetStream in stream order.
 */
import type { ConsumerInfo } from '@nats-io/jetstream';
import type { Hold, Holds } from './holds.ts';
import { apiErrorCode } from '../errors.ts';
import { Puller } from './pull.ts';
import { announcement, type WorkerView } from './workers.ts';
import type { KeyRunner } from './keys.ts';
import type { Outcomes } from './outcomes.ts';
import type { LanePulling } from './pulling.ts';
import { durableName, leaseFresh, leaseKey, newLane, quietly, workerKey, type Lane, type WorkerContext } from './state.ts';
import type { TopicDecider } from './topics.ts';

/** The parts a lease holder drives: what pulls a bucket, runs its keys, ends its messages, decides its topics. */
interface LeaseParts {
  readonly pulling: LanePulling;
  readonly runner: KeyRunner;
  readonly outcomes: Outcomes;
  readonly topics: TopicDecider;
  readonly holds: Holds;
}

export class BucketLeases {
  readonly #worker: WorkerContext;
  readonly #parts: LeaseParts;
  readonly #stopping: () => boolean;
  readonly #lanes = new Map<number, Lane>();
  /** Buckets given up because of a message this worker cannot handle: not taken again before this time. */
  readonly #declined = new Map<number, number>();
  /** The last disagreement between live workers warned about, so it is said once, not every heartbeat. */
  #disagreement: string | undefined;

  constructor(worker: WorkerContext, parts: LeaseParts, stopping: () => boolean) {
    this.#worker = worker;
    this.#parts = parts;
    this.#stopping = stopping;
  }

  /** The buckets held now (active or being released). */
  get lanes(): ReadonlyMap<number, Lane> {
    return this.#lanes;
  }

  /** Gives the bucket up and keeps off it for a lease's time (topics.ts: a live worker handles what this one cannot). */
  decline(lane: Lane): void {
    this.#declined.set(lane.bucket, Date.now() + this.#worker.nats.settings.leaseMs);
    void this.release(lane, true);
  }

  /** Announces this worker, renews its leases, and takes or gives up buckets to hold its share. */
  async heartbeat(): Promise<void> {
    if (this.#stopping()) return;
    const { nats, spec, owner } = this.#worker;
    const { leases, settings } = nats;
    await leases.put(workerKey(this.#worker), announcement(spec.topics));
    for (const lane of [...this.#lanes.values()]) {
      if (!lane.active) continue;
      const sentAt = Date.now();
      try {
        lane.revision = await leases.update(leaseKey(this.#worker, lane.bucket), owner, lane.revision);
        const fenced = !leaseFresh(this.#worker, lane);
        lane.renewedAt = sentAt; // the server's TTL started after this
        if (fenced) this.#parts.runner.pumpAll(lane); // its keys waited for this renewal (keys.ts)
      } catch (error) {
        // A conflict means another worker holds it now (ours expired during a pause). A failure to reach
        // NATS is waited out until the lease would have expired anyway.
        const conflict = apiErrorCode(error) === 10071 || /wrong last sequence/i.test(String((error as Error).message));
        if (conflict || Date.now() - lane.renewedAt > settings.leaseMs - settings.heartbeatMs) {
          nats.warn(`Subscription ${spec.name}: lost the lease of bucket ${lane.bucket}; its messages go back to JetStream`, error);
          const detail = `the lease of bucket ${lane.bucket} expired or was taken over`;
          nats.observer?.()?.emit('lease:lost', { subscription: spec.name, backbone: 'nats', detail });
          void this.release(lane, false);
        }
      }
    }
    if (this.#stopping()) return;
    const view = await this.#parts.topics.readWorkers();
    const target = this.#target(view);
    const held = [...this.#lanes.values()].filter((lane) => lane.active);
    if (held.length < target) {
      const start = Math.floor(Math.random() * settings.buckets);
      for (let i = 0; i < settings.buckets && this.#activeLanes() < target && !this.#stopping(); i++) {
        const bucket = (start + i) % settings.buckets;
        if (this.#lanes.has(bucket) || (this.#declined.get(bucket) ?? 0) > Date.now()) continue;
        let revision: number;
        const sentAt = Date.now();
        try {
          revision = await leases.create(leaseKey(this.#worker, bucket), owner);
        } catch {
          continue; // held by another worker
        }
        await this.#acquire(bucket, revision, sentAt);
      }
    } else if (held.length > target) {
      const extra = held.sort((a, b) => b.bucket - a.bucket).slice(0, held.length - target);
      for (const lane of extra) void this.release(lane, true);
    }
  }

  /**
   * How many buckets this worker should hold. They go to the workers that handle every topic of the
   * subscription; one that lacks a topic another live worker handles holds none while such a worker lives
   * (a rolling deploy), and the disagreement is warned about once. If no worker handles them all, each takes
   * its share and gives a bucket up when it meets a message it cannot handle (topics.ts).
   */
  #target(view: WorkerView): number {
    const { nats, spec, owner } = this.#worker;
    const { buckets } = nats.settings;
    const disagreement = view.disagreement();
    if (disagreement !== this.#disagreement) {
      this.#disagreement = disagreement;
      if (disagreement !== undefined) {
        const topics = view.topics === 'every' ? 'every topic' : [...view.topics].sort().join(', ');
        nats.warn(
          `Subscription ${spec.name}: its live workers handle different topics (${disagreement}; this one is ${owner}). ` +
            `The subscription's topics are ${topics}; its buckets go to the workers that handle all of them (${view.complete.map((w) => w.owner).join(', ') || 'none'}), ` +
            'and no worker acknowledges, dead-letters or skips a message of a topic another live worker handles. Finish the deploy so that every worker has the same handlers',
        );
      }
    }
    if (view.isComplete(owner)) return Math.ceil(buckets / view.complete.length);
    if (view.complete.length > 0) return 0;
    return Math.ceil(buckets / Math.max(1, view.workers.length));
  }

  #activeLanes(): number {
    let n = 0;
    for (const lane of this.#lanes.values()) if (lane.active) n++;
    return n;
  }

  async #acquire(bucket: number, revision: number, createdAt: number): Promise<void> {
    const { nats } = this.#worker;
    const { jsm, nc, settings, leases } = nats;
    const durable = durableName(this.#worker, bucket);
    let consumer: ConsumerInfo;
    let holds: Hold[];
    try {
      // Where the consumer's deliveries stand now: every later one should reach this lane, in order.
      consumer = await jsm.consumers.info(settings.stream, durable);
      // Read before anything of the bucket runs: a held key's later messages must not overtake it.
      holds = await this.#parts.holds.load(bucket);
    } catch (error) {
      await leases.delete(leaseKey(this.#worker, bucket), { previousSeq: revision }).catch(() => undefined);
      throw error;
    }
    const puller = new Puller({ nc, stream: settings.stream, durable, onMessage: (delivery) => this.#parts.pulling.receive(lane, delivery) });
    const lane = newLane(bucket, puller, revision, createdAt, consumer.delivered.consumer_seq + 1);
    // Messages delivered before now and not acknowledged went to an earlier owner, perhaps after its lease
    // lapsed (a stalled process's pull request is still served): the keys' later messages wait for them.
    if (consumer.num_ack_pending > 0) this.#parts.pulling.awaitEarlier(lane, consumer.num_ack_pending, consumer.delivered.stream_seq);
    for (const hold of holds.sort((a, b) => b.seq - a.seq)) lane.holds.set(hold.key, hold); // the oldest per key wins
    if (lane.holds.size > 0) {
      // A held message is pending with the consumer, so it comes back within an ack wait (leaseMs > ackWaitMs
      // + heartbeatMs: it is in the redelivery queue already). One that has not by then was acknowledged
      // after all (its hold written late by an owner that lost the bucket, or its message purged).
      lane.staleTimer = setTimeout(() => this.#dropStaleHolds(lane), 2 * settings.ackWaitMs + settings.fetchExpiresMs);
    }
    this.#lanes.set(bucket, lane);
    lane.loop = this.#parts.pulling.pull(lane);
  }

  #dropStaleHolds(lane: Lane): void {
    const { nats, spec } = this.#worker;
    lane.staleTimer = undefined;
    for (const [key, hold] of lane.holds) {
      if (!lane.active || lane.pulled.has(hold.seq)) continue;
      nats.warn(
        `Subscription ${spec.name}: the held message ${hold.id} (bucket ${lane.bucket}, stream sequence ${hold.seq}) did not come back; it was acknowledged already, so its key goes on`,
      );
      lane.holds.delete(key);
      void this.#parts.holds
        .delete(hold)
        .catch((error: unknown) => nats.warn(`Subscription ${spec.name}: could not delete the stale hold of message ${hold.id}`, error));
      const line = lane.keys.get(key);
      if (line !== undefined) this.#parts.runner.pump(lane, key, line);
    }
  }

  /**
   * Gives a bucket up: stop pulling, let running handlers finish and acknowledge, hand what is left back to
   * JetStream in stream order (nak: redelivered before anything newer), then free the lease if it is ours.
   * A message waiting for a delayed retry is handed back too; its durable hold keeps its time and history
   * for the next owner.
   */
  release(lane: Lane, ours: boolean): Promise<void> {
    lane.released ??= (async () => {
      lane.active = false;
      lane.wakeLoop?.();
      await lane.loop;
      // Every pull request is over: nothing more can arrive, so what is held now is all there is to hand back.
      await lane.puller.close();
      clearTimeout(lane.gapTimer);
      clearTimeout(lane.earlier?.timer);
      clearTimeout(lane.staleTimer);
      while (lane.running.size > 0) await Promise.all([...lane.running]);
      this.#parts.outcomes.sendAcks();
      for (const line of lane.keys.values()) clearTimeout(line.retryTimer);
      const left = [...lane.pulled.values()].sort((a, b) => a.seq - b.seq);
      for (const pulled of left) {
        this.#parts.topics.forget(pulled);
        quietly(() => pulled.msg.nak());
      }
      lane.pulled.clear();
      lane.keys.clear();
      await this.#worker.nats.nc.flush().catch(() => undefined);
      if (ours) await this.#worker.nats.leases.delete(leaseKey(this.#worker, lane.bucket), { previousSeq: lane.revision }).catch(() => undefined);
      if (this.#lanes.get(lane.bucket) === lane) this.#lanes.delete(lane.bucket);
    })();
    return lane.released;
  }

  /** Gives every bucket up (stopping). */
  releaseAll(): Promise<void> {
    return Promise.all([...this.#lanes.values()].map((lane) => this.release(lane, true))).then(() => undefined);
  }
}
