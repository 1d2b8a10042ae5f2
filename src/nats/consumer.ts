import { hostname } from 'node:os';
import type { ConsumerConfig } from '@nats-io/jetstream';
import { client } from './client.ts';
import { EVERY_TOPIC, type Consumer, type DeliveryHandler, type SubscriptionSpec } from '../core/backbone.ts';
import type { Envelope } from '../core/envelope.ts';
import { runAttempts, type AttemptScope } from '../core/attempts.ts';
import { describeError, TidingsError, type AttemptRecord } from '../core/errors.ts';
import { decode, header, headerFields, headersToRecord, nameToken, REDRIVE_FOR } from './codec.ts';
import { deadLetterEncodings, type DeadLetterRecord } from './dead-letters.ts';
import type { NatsContext } from './context.ts';
import { apiErrorCode, isUnavailable } from './errors.ts';
import { Holds, type Hold } from './holds.ts';
import { readEntries } from './kv.ts';
import { Puller, type Delivered } from './pull.ts';
import { announcement, readAnnouncement, WorkerView, type LiveWorker } from './workers.ts';

/** A message this worker has pulled and not yet acknowledged (or handed back). */
interface Pulled {
  msg: Delivered;
  readonly seq: number;
  readonly subject: string;
  readonly topic: string;
  /** Its partition key: its line in the bucket (an undecodable message has a line of its own). */
  readonly key: string;
  /**
   * Who runs it: this worker ('here'); unknown until a read of the workers made after it arrived says
   * whether the subscription has its topic ('undecided'); a worker that is not running, since the topic is
   * the subscription's but no live worker handles it ('waiting': held here, its key with it, and decided
   * again at each heartbeat); or another live worker ('elsewhere': left to it, and the bucket given up).
   */
  where: 'here' | 'undecided' | 'waiting' | 'elsewhere';
  /** For an undecided message: the number of worker reads begun before it arrived (see #askView). */
  readonly readsBefore: number;
  /** Undefined when the message cannot be decoded (it goes to dead letters), or is not run here. */
  readonly envelope: Envelope | undefined;
  readonly problem: string | undefined;
  /** Attempts made before this worker got it: from its durable hold, else JetStream's earlier deliveries. */
  readonly earlier: number;
  /** Attempts made by this worker. */
  attempts: number;
  /** Every failed attempt's error, for the dead letter; durable from its first delayed retry on (holds.ts). */
  readonly history: AttemptRecord[];
  /** Not to run before this time (epoch ms): a delayed retry. */
  dueAt: number;
  /** Its durable hold, once it waits for a delayed retry. */
  hold: Hold | undefined;
  touchedAt: number;
}

/** The messages of one key in this bucket, in stream order: one runs at a time, the rest wait behind it. */
interface KeyLine {
  readonly queue: Pulled[];
  busy: boolean;
  retryTimer: NodeJS.Timeout | undefined;
}

/** A bucket this worker holds the lease of, and pulls from through its durable consumer. */
interface Lane {
  readonly bucket: number;
  readonly puller: Puller;
  revision: number;
  renewedAt: number;
  active: boolean;
  readonly pulled: Map<number, Pulled>;
  readonly keys: Map<string, KeyLine>;
  /** The bucket's durable holds by partition key: nothing later of that key runs before the held message. */
  readonly holds: Map<string, Hold>;
  readonly running: Set<Promise<void>>;
  loop: Promise<void> | undefined;
  wakeLoop: (() => void) | undefined;
  released: Promise<void> | undefined;
  /** The consumer sequence the next delivery should carry; a jump means deliveries that never arrived. */
  nextDelivery: number;
  /** Set while no handler may start in this lane: deliveries that never arrived are on their way back. */
  gapTimer: NodeJS.Timeout | undefined;
  /** When the holds loaded with the bucket whose message never came back are given up (see #acquire). */
  staleTimer: NodeJS.Timeout | undefined;
}

/**
 * One subscription's worker in this process. The stream's subjects are split into buckets by key hash; the
 * subscription has one durable pull consumer per bucket, and a bucket is pulled by one worker at a time,
 * the holder of its lease in the stream's KV bucket. So a key's messages reach one process, in stream
 * order, and this worker runs them one at a time per key, up to `concurrency` keys at once.
 *
 * Leases: each worker announces itself and the topics it handles (`<subscription>.worker.<id>`, renewed
 * every heartbeat, expiring with the KV bucket's TTL). The buckets are shared by the workers that handle
 * every topic of the subscription (workers.ts): ceil(buckets / those workers) leases each
 * (`<subscription>.lease.<bucket>`), renewed by compare-and-set on their revision. A worker that gives a
 * bucket up finishes what runs, hands the rest back with a nak in stream order (JetStream redelivers before
 * anything newer), then deletes the lease. A worker that dies stops renewing; leaseMs > ackWaitMs +
 * heartbeatMs guarantees its messages are back in JetStream's redelivery queue before another worker takes
 * the bucket, and its delayed retries' holds (holds.ts) are read by that worker before it runs anything.
 */
export class NatsConsumer implements Consumer {
  readonly #ctx: NatsContext;
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<undefined>;
  readonly #token: string;
  readonly #owner = `${hostname().replace(/[^\w-]/g, '_')}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
  readonly #lanes = new Map<number, Lane>();
  readonly #holds: Holds;
  /** Acknowledgements waiting for the end of this turn of the event loop (see #sendAcks). */
  readonly #acks: Delivered[] = [];
  #acksDue: NodeJS.Immediate | undefined;
  readonly #everyTopic: boolean;
  readonly #topics: ReadonlySet<string>;
  #stopping = false;
  #timer: NodeJS.Timeout | undefined;
  #keepAlive: NodeJS.Timeout | undefined;
  #beating: Promise<void> | undefined;
  /** Handlers running in this process, across lanes, at most `concurrency`. */
  #inFlight = 0;
  readonly #slotWaiters: Array<() => void> = [];
  /** Messages of topics this worker has no handler for, until a read of the workers decides them. */
  readonly #undecided = new Map<Pulled, Lane>();
  /** Messages of the subscription's topics that no live worker handles, decided again at each heartbeat. */
  readonly #waiting = new Map<Pulled, Lane>();
  /** The topics whose messages wait for a worker that handles them, warned about once. */
  readonly #unhandled = new Set<string>();
  /** Reads of the live workers begun so far, and the one asked for by undecided messages, if running. */
  #reads = 0;
  #asking: Promise<void> | undefined;
  /** The last disagreement between live workers warned about, so it is said once, not every heartbeat. */
  #disagreement: string | undefined;
  /** Buckets given up because of a message this worker cannot handle: not taken again before this time. */
  readonly #declined = new Map<number, number>();

  constructor(ctx: NatsContext, spec: SubscriptionSpec, handle: DeliveryHandler<undefined>) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#handle = handle;
    this.#token = nameToken(spec.name);
    this.#everyTopic = spec.topics.includes(EVERY_TOPIC);
    this.#topics = new Set(spec.topics);
    this.#holds = new Holds(ctx.holds, ctx.jsm, ctx.holdsBucket, this.#token);
  }

  get #maxPending(): number {
    return this.#spec.concurrency * this.#ctx.settings.ackPendingPerHandler;
  }

  #durable(bucket: number): string {
    return `${this.#token}_${bucket}`;
  }

  #leaseKey(bucket: number): string {
    return `${this.#token}.lease.${bucket}`;
  }

  get #workerKey(): string {
    return `${this.#token}.worker.${this.#owner}`;
  }

  /** In the holds bucket (it does not expire): the topics of the subscription's last worker started. */
  get #newestKey(): string {
    return `${this.#token}.newest`;
  }

  async start(): Promise<void> {
    const { settings } = this.#ctx;
    await Promise.all(Array.from({ length: settings.buckets }, (_, bucket) => this.#ensureConsumer(bucket)));
    await this.#ctx.holds.put(this.#newestKey, JSON.stringify({ owner: this.#owner, announcement: announcement(this.#spec.topics) }));
    await this.#heartbeat();
    this.#timer = setInterval(() => this.#beat(), settings.heartbeatMs);
    this.#keepAlive = setInterval(() => this.#touch(), Math.max(100, Math.floor(settings.ackWaitMs / 3)));
  }

  /** A heartbeat now, unless one runs. */
  #beat(): void {
    this.#beating ??= this.#heartbeat()
      .catch((error: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: heartbeat failed; retrying`, error))
      .finally(() => {
        this.#beating = undefined;
      });
  }

  /** Declares the bucket's durable consumer, or brings the settings Tidings owns up to date. Idempotent. */
  async #ensureConsumer(bucket: number): Promise<void> {
    const { jsm, settings } = this.#ctx;
    const name = this.#durable(bucket);
    const config: Partial<ConsumerConfig> = {
      durable_name: name,
      description: `Tidings subscription ${this.#spec.name}, bucket ${bucket} of ${settings.buckets}`,
      ack_policy: client().jetstream.AckPolicy.Explicit,
      filter_subject: `${settings.subjectPrefix}.${bucket}.>`,
      deliver_policy: this.#spec.startFrom === 'beginning' ? client().jetstream.DeliverPolicy.All : client().jetstream.DeliverPolicy.New,
      ack_wait: client().transport.nanos(settings.ackWaitMs),
      max_ack_pending: this.#maxPending,
      // Tidings counts attempts and dead-letters itself; JetStream must never drop a message on its own.
      max_deliver: -1,
    };
    const existing = await jsm.consumers.info(settings.stream, name).catch((error: unknown) => {
      if (apiErrorCode(error) === 10014) return undefined; // consumer not found
      throw error;
    });
    if (existing === undefined) {
      try {
        await jsm.consumers.add(settings.stream, config);
      } catch (error) {
        // Another worker created it at the same moment.
        if ((await jsm.consumers.info(settings.stream, name).catch(() => undefined)) === undefined) throw error;
      }
      return;
    }
    if (existing.config.ack_wait !== config.ack_wait || existing.config.max_ack_pending !== config.max_ack_pending) {
      await jsm.consumers.update(settings.stream, name, { ack_wait: config.ack_wait!, max_ack_pending: config.max_ack_pending! });
    }
  }

  async stop(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    clearInterval(this.#timer);
    await this.#beating?.catch(() => undefined);
    await Promise.all([...this.#lanes.values()].map((lane) => this.#release(lane, true)));
    await this.#asking?.catch(() => undefined);
    clearInterval(this.#keepAlive);
    await this.#ctx.leases.delete(this.#workerKey).catch(() => undefined);
  }

  // ---- leases ------------------------------------------------------------------------------------

  async #heartbeat(): Promise<void> {
    if (this.#stopping) return;
    const { leases, settings } = this.#ctx;
    await leases.put(this.#workerKey, announcement(this.#spec.topics));
    for (const lane of [...this.#lanes.values()]) {
      if (!lane.active) continue;
      try {
        lane.revision = await leases.update(this.#leaseKey(lane.bucket), this.#owner, lane.revision);
        lane.renewedAt = Date.now();
      } catch (error) {
        // A conflict means another worker holds it now (ours expired during a pause). A failure to reach
        // NATS is waited out until the lease would have expired anyway.
        const conflict = apiErrorCode(error) === 10071 || /wrong last sequence/i.test(String((error as Error).message));
        if (conflict || Date.now() - lane.renewedAt > settings.leaseMs - settings.heartbeatMs) {
          this.#ctx.warn(`Subscription ${this.#spec.name}: lost the lease of bucket ${lane.bucket}; its messages go back to JetStream`, error);
          const detail = `the lease of bucket ${lane.bucket} expired or was taken over`;
          this.#ctx.observer?.()?.emit('lease:lost', { subscription: this.#spec.name, backbone: 'nats', detail });
          void this.#release(lane, false);
        }
      }
    }
    if (this.#stopping) return;
    const view = await this.#readWorkers();
    const target = this.#target(view);
    const held = [...this.#lanes.values()].filter((lane) => lane.active);
    if (held.length < target) {
      const start = Math.floor(Math.random() * settings.buckets);
      for (let i = 0; i < settings.buckets && this.#activeLanes() < target && !this.#stopping; i++) {
        const bucket = (start + i) % settings.buckets;
        if (this.#lanes.has(bucket) || (this.#declined.get(bucket) ?? 0) > Date.now()) continue;
        let revision: number;
        try {
          revision = await leases.create(this.#leaseKey(bucket), this.#owner);
        } catch {
          continue; // held by another worker
        }
        await this.#acquire(bucket, revision);
      }
    } else if (held.length > target) {
      const extra = held.sort((a, b) => b.bucket - a.bucket).slice(0, held.length - target);
      for (const lane of extra) void this.#release(lane, true);
    }
  }

  /**
   * How many buckets this worker should hold. They go to the workers that handle every topic of the
   * subscription; one that lacks a topic another live worker handles holds none while such a worker lives
   * (a rolling deploy), and the disagreement is warned about once. If no worker handles them all, each takes
   * its share and gives a bucket up when it meets a message it cannot handle (#leaveToOthers).
   */
  #target(view: WorkerView): number {
    const { buckets } = this.#ctx.settings;
    const disagreement = view.disagreement();
    if (disagreement !== this.#disagreement) {
      this.#disagreement = disagreement;
      if (disagreement !== undefined) {
        const topics = view.topics === 'every' ? 'every topic' : [...view.topics].sort().join(', ');
        this.#ctx.warn(
          `Subscription ${this.#spec.name}: its live workers handle different topics (${disagreement}; this one is ${this.#owner}). ` +
            `The subscription's topics are ${topics}; its buckets go to the workers that handle all of them (${view.complete.map((w) => w.owner).join(', ') || 'none'}), ` +
            'and no worker acknowledges, dead-letters or skips a message of a topic another live worker handles. Finish the deploy so that every worker has the same handlers',
        );
      }
    }
    if (view.isComplete(this.#owner)) return Math.ceil(buckets / view.complete.length);
    if (view.complete.length > 0) return 0;
    return Math.ceil(buckets / Math.max(1, view.workers.length));
  }

  #activeLanes(): number {
    let n = 0;
    for (const lane of this.#lanes.values()) if (lane.active) n++;
    return n;
  }

  /** The live workers of the subscription, its newest worker and what they handle, read now; decides messages. */
  async #readWorkers(): Promise<WorkerView> {
    const read = ++this.#reads;
    const prefix = `${this.#token}.worker.`;
    const [entries, newestEntry] = await Promise.all([
      readEntries(this.#ctx.jsm, this.#ctx.leases, this.#ctx.leasesBucket, `${prefix}*`),
      this.#ctx.holds.get(this.#newestKey),
    ]);
    const workers = entries.map((entry) => readAnnouncement(entry.key.slice(prefix.length), entry.string()));
    if (!workers.some((worker) => worker.owner === this.#owner)) workers.push(readAnnouncement(this.#owner, announcement(this.#spec.topics)));
    let newest: LiveWorker | undefined;
    if (newestEntry !== null && newestEntry.operation === 'PUT') {
      const { owner, announcement: topics } = newestEntry.json<{ owner: string; announcement: string }>();
      newest = readAnnouncement(owner, topics);
    }
    const view = new WorkerView(workers, newest);
    this.#decide(view, read);
    return view;
  }

  async #acquire(bucket: number, revision: number): Promise<void> {
    const { jsm, nc, settings, leases } = this.#ctx;
    let delivered: number;
    let holds: Hold[];
    try {
      // Where the consumer's deliveries stand now: every later one should reach this lane, in order.
      delivered = (await jsm.consumers.info(settings.stream, this.#durable(bucket))).delivered.consumer_seq;
      // Read before anything of the bucket runs: a held key's later messages must not overtake it.
      holds = await this.#holds.load(bucket);
    } catch (error) {
      await leases.delete(this.#leaseKey(bucket), { previousSeq: revision }).catch(() => undefined);
      throw error;
    }
    const lane: Lane = {
      bucket,
      puller: new Puller({
        nc,
        stream: settings.stream,
        durable: this.#durable(bucket),
        onMessage: (delivery) => this.#receive(lane, delivery),
      }),
      revision,
      renewedAt: Date.now(),
      active: true,
      pulled: new Map(),
      keys: new Map(),
      holds: new Map(),
      running: new Set(),
      loop: undefined,
      wakeLoop: undefined,
      released: undefined,
      nextDelivery: delivered + 1,
      gapTimer: undefined,
      staleTimer: undefined,
    };
    for (const hold of holds.sort((a, b) => b.seq - a.seq)) lane.holds.set(hold.key, hold); // the oldest per key wins
    if (lane.holds.size > 0) {
      // A held message is pending with the consumer, so it comes back within an ack wait (leaseMs > ackWaitMs
      // + heartbeatMs: it is in the redelivery queue already). One that has not by then was acknowledged
      // after all (its hold written late by an owner that lost the bucket, or its message purged).
      lane.staleTimer = setTimeout(() => this.#dropStaleHolds(lane), 2 * settings.ackWaitMs + settings.fetchExpiresMs);
    }
    this.#lanes.set(bucket, lane);
    lane.loop = this.#pull(lane);
  }

  #dropStaleHolds(lane: Lane): void {
    lane.staleTimer = undefined;
    for (const [key, hold] of lane.holds) {
      if (!lane.active || lane.pulled.has(hold.seq)) continue;
      this.#ctx.warn(
        `Subscription ${this.#spec.name}: the held message ${hold.id} (bucket ${lane.bucket}, stream sequence ${hold.seq}) did not come back; it was acknowledged already, so its key goes on`,
      );
      lane.holds.delete(key);
      void this.#holds
        .delete(hold)
        .catch((error: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: could not delete the stale hold of message ${hold.id}`, error));
      const line = lane.keys.get(key);
      if (line !== undefined) this.#pump(lane, key, line);
    }
  }

  /**
   * Gives a bucket up: stop pulling, let running handlers finish and acknowledge, hand what is left back to
   * JetStream in stream order (nak: redelivered before anything newer), then free the lease if it is ours.
   * A message waiting for a delayed retry is handed back too; its durable hold keeps its time and history
   * for the next owner.
   */
  #release(lane: Lane, ours: boolean): Promise<void> {
    lane.released ??= (async () => {
      lane.active = false;
      lane.wakeLoop?.();
      await lane.loop;
      // Every pull request is over: nothing more can arrive, so what is held now is all there is to hand back.
      await lane.puller.close();
      clearTimeout(lane.gapTimer);
      clearTimeout(lane.staleTimer);
      while (lane.running.size > 0) await Promise.all([...lane.running]);
      this.#sendAcks();
      for (const line of lane.keys.values()) clearTimeout(line.retryTimer);
      const left = [...lane.pulled.values()].sort((a, b) => a.seq - b.seq);
      for (const pulled of left) {
        this.#undecided.delete(pulled);
        this.#waiting.delete(pulled);
        quietly(() => pulled.msg.nak());
      }
      lane.pulled.clear();
      lane.keys.clear();
      await this.#ctx.nc.flush().catch(() => undefined);
      if (ours) await this.#ctx.leases.delete(this.#leaseKey(lane.bucket), { previousSeq: lane.revision }).catch(() => undefined);
      if (this.#lanes.get(lane.bucket) === lane) this.#lanes.delete(lane.bucket);
    })();
    return lane.released;
  }

  // ---- pulling -----------------------------------------------------------------------------------

  /**
   * Pulls while the lane is active, never more than max_ack_pending in memory. A pull is never abandoned
   * half way: what JetStream sends for it is received, so nothing sits unseen in the client when the
   * bucket changes hands.
   */
  async #pull(lane: Lane): Promise<void> {
    const { settings } = this.#ctx;
    let failures = 0;
    while (lane.active) {
      const room = this.#maxPending - lane.pulled.size;
      if (room <= 0) {
        await this.#pause(lane, settings.fetchExpiresMs);
        continue;
      }
      try {
        await lane.puller.pull(Math.min(room, this.#spec.batchSize), settings.fetchExpiresMs);
        failures = 0;
      } catch (error) {
        if (!lane.active) break;
        failures++;
        const wait = Math.min(settings.errorBackoffMs * 2 ** Math.min(failures, 5), 10_000) || 100;
        this.#ctx.warn(`Subscription ${this.#spec.name}: pulling bucket ${lane.bucket} failed; retrying in ${wait} ms`, error);
        await this.#pause(lane, wait);
      }
    }
  }

  #pause(lane: Lane, ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        lane.wakeLoop = undefined;
        resolve();
      }
      lane.wakeLoop = done;
    });
  }

  #receive(lane: Lane, msg: Delivered): void {
    const seq = msg.seq;
    const known = lane.pulled.get(seq);
    if (msg.deliverySeq > lane.nextDelivery) this.#holdBucket(lane, msg.deliverySeq - lane.nextDelivery);
    lane.nextDelivery = Math.max(lane.nextDelivery, msg.deliverySeq + 1);
    if (known !== undefined) {
      // Redelivered while we still hold it (its ack wait ran out): keep one copy, answer the newest delivery.
      known.msg = msg;
      known.touchedAt = Date.now();
      return;
    }
    const { settings } = this.#ctx;
    // The bucket's consumer reads `<prefix>.<bucket>.>` only (the stream takes nothing else): the rest is the topic.
    const topic = msg.subject.slice(settings.subjectPrefix.length + String(lane.bucket).length + 2);
    const fields = headerFields(msg.headers);
    const redriveFor = fields.get(REDRIVE_FOR);
    if (redriveFor !== undefined && redriveFor !== this.#spec.name) {
      quietly(() => msg.ack()); // a redrive meant for another subscription
      return;
    }
    const here = this.#everyTopic || this.#topics.has(topic);
    const decoded = here ? decode(fields, msg.data, topic, msg.timestampNanos) : undefined;
    // Undecodable messages have no key to keep in order: they go to dead letters straight away. One not run
    // here is read no further than its key (as decode reads it).
    const key = (here ? decoded?.envelope?.partitionkey : (fields.get('ce-partitionkey') ?? fields.get('ce-id'))) ?? `\u0000undecodable:${seq}`;
    const hold = lane.holds.get(key);
    const held = hold?.seq === seq ? hold : undefined;
    const pulled: Pulled = {
      msg,
      seq,
      subject: msg.subject,
      topic,
      key,
      where: here ? 'here' : 'undecided',
      readsBefore: this.#reads,
      envelope: decoded?.envelope,
      problem: decoded?.problem,
      earlier: held?.attempts.length ?? Math.max(0, msg.deliveries - 1),
      attempts: 0,
      history: [...(held?.attempts ?? [])],
      dueAt: held?.dueAt ?? 0,
      hold: held,
      touchedAt: Date.now(),
    };
    lane.pulled.set(seq, pulled);
    let line = lane.keys.get(pulled.key);
    if (line === undefined) {
      line = { queue: [], busy: false, retryTimer: undefined };
      lane.keys.set(pulled.key, line);
    }
    // In stream order: a delivery that comes back late (see #holdBucket) goes before the key's later messages
    // still waiting. The head stays put once it has started or been tried.
    const first = line.busy || line.retryTimer !== undefined || (line.queue[0]?.attempts ?? 0) > 0 ? 1 : 0;
    let at = line.queue.length;
    while (at > first && line.queue[at - 1]!.seq > seq) at--;
    line.queue.splice(at, 0, pulled);
    if (pulled.where === 'undecided') {
      // Another subscription's topic, or one of this subscription's that another live worker handles: only a
      // read of the live workers made after it arrived can tell (a worker started a moment ago may handle it).
      // Its key waits meanwhile.
      this.#undecided.set(pulled, lane);
      this.#askWorkers();
    }
    this.#pump(lane, pulled.key, line);
  }

  /** Reads the live workers for the undecided messages, one read at a time, again while any arrived during one. */
  #askWorkers(): void {
    if (this.#asking !== undefined || this.#stopping) return;
    this.#asking = this.#readWorkers()
      .then(
        () => undefined,
        async (error: unknown) => {
          this.#ctx.warn(`Subscription ${this.#spec.name}: could not read its live workers; retrying in ${this.#ctx.settings.errorBackoffMs} ms`, error);
          await new Promise((resolve) => setTimeout(resolve, this.#ctx.settings.errorBackoffMs));
        },
      )
      .finally(() => {
        this.#asking = undefined;
        if (this.#undecided.size > 0) this.#askWorkers();
      });
  }

  /**
   * Settles the messages that arrived before read `read` began, and those waiting for a worker: a topic that
   * is not the subscription's is acknowledged unseen; one another live worker handles is left to it; one no
   * live worker handles (its newest worker's, which is not running) waits here.
   */
  #decide(view: WorkerView, read: number): void {
    for (const [pulled, lane] of [...this.#undecided, ...this.#waiting]) {
      if (pulled.where === 'undecided' && pulled.readsBefore >= read) continue;
      this.#undecided.delete(pulled);
      this.#waiting.delete(pulled);
      if (!lane.active || lane.pulled.get(pulled.seq) !== pulled) continue; // handed back meanwhile
      const handlers = view.handlersOf(pulled.topic);
      if (view.has(pulled.topic) && handlers.length === 0) {
        pulled.where = 'waiting';
        this.#waiting.set(pulled, lane);
        if (!this.#unhandled.has(pulled.topic)) {
          this.#unhandled.add(pulled.topic);
          this.#ctx.warn(
            `Subscription ${this.#spec.name}: topic ${pulled.topic} is its newest worker's (${view.newest?.owner}), but no live worker handles it; ` +
              `its messages wait in the buckets worker ${this.#owner} holds, and their keys with them, until a worker that handles it runs again (or a newer worker without it starts)`,
          );
        }
        continue;
      }
      this.#unhandled.delete(pulled.topic);
      if (handlers.length === 0) {
        const line = lane.keys.get(pulled.key)!;
        if (pulled.hold === undefined) {
          this.#done(lane, line, pulled, 'ack');
          this.#pump(lane, pulled.key, line);
        } else {
          // Its topic's handlers are gone while it waited for a retry: its hold goes first.
          const finishing = this.#finish(lane, line, pulled, 'ack').then(() => this.#pump(lane, pulled.key, line));
          lane.running.add(finishing);
          void finishing.finally(() => lane.running.delete(finishing));
        }
      } else {
        pulled.where = 'elsewhere';
        this.#leaveToOthers(
          lane,
          pulled,
          handlers.map((worker) => worker.owner),
        );
      }
    }
  }

  /**
   * This worker has no handler for a topic of its subscription that other live workers handle: it never
   * acknowledges, dead-letters or skips such a message. It gives the bucket up (the message and its key's
   * later ones go back to JetStream in order) and does not take it again for a lease's time.
   */
  #leaveToOthers(lane: Lane, pulled: Pulled, handlers: string[]): void {
    if (!lane.active) return;
    const id = header(pulled.msg.headers, 'ce-id') ?? `sequence ${pulled.seq}`;
    this.#ctx.warn(
      `Subscription ${this.#spec.name}: worker ${this.#owner} has no handler for topic ${pulled.topic} (message ${id}, bucket ${lane.bucket}), which ${handlers.join(', ')} handle${handlers.length === 1 ? 's' : ''}; ` +
        `it leaves the message and its key to ${handlers.length === 1 ? 'it' : 'them'} and gives bucket ${lane.bucket} up`,
    );
    this.#declined.set(lane.bucket, Date.now() + this.#ctx.settings.leaseMs);
    void this.#release(lane, true);
    this.#beat();
  }

  /**
   * Deliveries numbered between the last one received and this one never reached this lane (lost on a
   * reconnection, or taken by a pull that is not ours). JetStream holds them as delivered and redelivers them
   * once their ack wait runs out; until then nothing new starts in this bucket, or a key's later messages
   * would run before them. What arrives meanwhile waits in its key's line, and the lost ones take their place
   * in stream order when they come back.
   */
  #holdBucket(lane: Lane, missing: number): void {
    const { settings } = this.#ctx;
    // They were delivered before now, so JetStream redelivers them within ackWaitMs; a pull's length on top.
    const holdMs = settings.ackWaitMs + settings.fetchExpiresMs;
    this.#ctx.warn(
      `Subscription ${this.#spec.name}: ${missing} deliveries of bucket ${lane.bucket} never arrived (from consumer sequence ${lane.nextDelivery}); holding the bucket ${holdMs} ms until JetStream redelivers them`,
    );
    clearTimeout(lane.gapTimer);
    lane.gapTimer = setTimeout(() => {
      lane.gapTimer = undefined;
      for (const [key, line] of lane.keys) this.#pump(lane, key, line);
    }, holdMs);
  }

  /** JetStream redelivers after ackWaitMs; a message held here (running, queued, waiting to retry) is kept alive. */
  #touch(): void {
    const now = Date.now();
    const every = this.#ctx.settings.ackWaitMs / 3;
    for (const lane of this.#lanes.values()) {
      for (const pulled of lane.pulled.values()) {
        if (now - pulled.touchedAt < every) continue;
        quietly(() => pulled.msg.working());
        pulled.touchedAt = now;
      }
    }
  }

  // ---- handling ----------------------------------------------------------------------------------

  #pump(lane: Lane, key: string, line: KeyLine): void {
    if (line.busy || line.retryTimer !== undefined || !lane.active || lane.gapTimer !== undefined) return;
    const head = line.queue[0];
    if (head === undefined && lane.keys.get(key) === line) lane.keys.delete(key); // emptied by #decide
    if (head === undefined || head.where !== 'here') return;
    // A held message of this key has not come back yet: it runs first.
    const hold = lane.holds.get(key);
    if (hold !== undefined && hold.seq !== head.seq) return;
    const wait = head.dueAt - Date.now();
    if (wait > 0) {
      // The key waits here, its later messages unacknowledged behind it and kept alive; other keys flow.
      line.retryTimer = setTimeout(() => {
        line.retryTimer = undefined;
        this.#pump(lane, key, line);
      }, wait);
      return;
    }
    line.busy = true;
    const run = this.#runHead(lane, line).catch((error: unknown) => {
      this.#ctx.warn(`Subscription ${this.#spec.name}: unexpected failure handling bucket ${lane.bucket}`, error);
    });
    lane.running.add(run);
    void run.finally(() => {
      lane.running.delete(run);
      line.busy = false;
      if (line.queue.length === 0 && line.retryTimer === undefined) lane.keys.delete(key);
      else this.#pump(lane, key, line);
    });
  }

  async #slot(): Promise<void> {
    if (this.#inFlight < this.#spec.concurrency) {
      this.#inFlight++;
      return;
    }
    await new Promise<void>((resolve) => this.#slotWaiters.push(resolve));
  }

  #freeSlot(): void {
    const next = this.#slotWaiters.shift();
    if (next !== undefined) next();
    else this.#inFlight--;
  }

  /** Runs the key's first message: immediate retries in place, until it is acknowledged, delayed or dead. */
  async #runHead(lane: Lane, line: KeyLine): Promise<void> {
    await this.#slot();
    try {
      const head = line.queue[0];
      // The bucket may have been given up, or put on hold, while this waited for a slot.
      if (head === undefined || !lane.active || lane.gapTimer !== undefined) return;
      if (head.envelope === undefined) {
        const reason = `UNDECODABLE_MESSAGE: the message at subject ${head.subject}, stream ${this.#ctx.settings.stream} sequence ${head.seq}, cannot be decoded: ${head.problem}`;
        const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, { ref: { topic: head.topic } }));
        head.history.push({ attempt: head.earlier + 1, at: new Date().toISOString(), error });
        if (await this.#deadLetter(lane, head, reason)) await this.#finish(lane, line, head, 'term');
        return;
      }
      const envelope = head.envelope;
      const result = await runAttempts(this.#handle, {
        first: head.earlier + head.attempts + 1,
        history: head.history,
        retry: this.#spec.retry,
        envelope: () => envelope,
        open: (attempt) => {
          head.attempts = attempt - head.earlier;
          return NO_TRANSACTION;
        },
        stopping: () => !lane.active,
      });
      if (result.kind === 'ack') {
        if (head.hold === undefined) this.#done(lane, line, head, 'ack');
        else await this.#finish(lane, line, head, 'ack');
      } else if (result.kind === 'dead') {
        if (await this.#deadLetter(lane, head, result.reason)) await this.#finish(lane, line, head, 'term');
      } else {
        // #pump starts the wait once this returns; the hold makes it outlive this worker.
        head.dueAt = Date.now() + result.delayMs;
        await this.#holdKey(lane, head);
      }
    } finally {
      this.#freeSlot();
    }
  }

  /** Writes the message's durable hold (holds.ts) before its key starts waiting for the delayed retry. */
  async #holdKey(lane: Lane, pulled: Pulled): Promise<void> {
    const envelope = pulled.envelope!;
    try {
      pulled.hold = await this.#holds.put(lane.bucket, {
        revision: pulled.hold?.revision ?? 0,
        seq: pulled.seq,
        key: pulled.key,
        id: envelope.id,
        dueAt: pulled.dueAt,
        attempts: pulled.history,
      });
      lane.holds.set(pulled.key, pulled.hold);
    } catch (error) {
      this.#ctx.warn(
        `Subscription ${this.#spec.name}: could not write the hold of message ${envelope.id} (${pulled.topic}, key ${pulled.key}); it waits for its retry in this worker only, so a crash before then loses the time left and the attempt history`,
        error,
      );
    }
  }

  /**
   * Acknowledges or terminates a message that has a durable hold: the hold is deleted first (confirmed), so
   * that no hold outlives its message. If NATS cannot be reached and the bucket is given up meanwhile, the
   * message is handed back with its hold, and handled again by the next owner (at least once).
   */
  async #finish(lane: Lane, line: KeyLine, pulled: Pulled, how: 'ack' | 'term'): Promise<void> {
    const hold = pulled.hold;
    while (hold !== undefined) {
      try {
        await this.#holds.delete(hold);
        if (lane.holds.get(pulled.key) === hold) lane.holds.delete(pulled.key);
        break;
      } catch (error) {
        this.#ctx.warn(
          `Subscription ${this.#spec.name}: could not delete the hold of message ${hold.id}; retrying in ${this.#ctx.settings.errorBackoffMs} ms`,
          error,
        );
        if (!lane.active) return;
        await new Promise((resolve) => setTimeout(resolve, this.#ctx.settings.errorBackoffMs));
        if (!lane.active) return;
      }
    }
    this.#done(lane, line, pulled, how);
  }

  #done(lane: Lane, line: KeyLine, pulled: Pulled, how: 'ack' | 'term'): void {
    if (how === 'ack') {
      this.#acks.push(pulled.msg);
      this.#acksDue ??= setImmediate(() => this.#sendAcks());
    } else {
      quietly(() => pulled.msg.term());
    }
    const at = line.queue.indexOf(pulled);
    if (at >= 0) line.queue.splice(at, 1);
    lane.pulled.delete(pulled.seq);
    // The pull loop may be waiting for room under max_ack_pending.
    if (lane.pulled.size === this.#maxPending - 1) lane.wakeLoop?.();
  }

  /**
   * Sends the acknowledgements of the handlers finished in this turn of the event loop. nats.js writes what
   * is queued at the next microtask, so acks sent as each handler finished went out one socket write each;
   * sent together they share one. On a closed connection they throw: the messages come again (at least once).
   */
  #sendAcks(): void {
    clearImmediate(this.#acksDue);
    this.#acksDue = undefined;
    for (const msg of this.#acks.splice(0)) quietly(() => msg.ack());
  }

  /**
   * Writes the dead letter to the dead-letter stream, confirmed, before the message is terminated: the first
   * of deadLetterEncodings that NATS takes. If NATS cannot be reached, the message stays (its key held) and
   * is tried again after errorBackoffMs.
   */
  async #deadLetter(lane: Lane, pulled: Pulled, reason: string): Promise<boolean> {
    const { js, nc, settings, dlqPrefix } = this.#ctx;
    const envelope = pulled.envelope ?? undecodableEnvelope(pulled, settings.stream);
    const record: DeadLetterRecord = {
      subscription: this.#spec.name,
      messageId: envelope.id,
      topic: pulled.topic,
      key: envelope.partitionkey,
      reason,
      attempts: pulled.history,
      deadAt: new Date().toISOString(),
      envelope,
      source: {
        stream: settings.stream,
        sequence: pulled.seq,
        subject: pulled.subject,
        headers: headersToRecord(pulled.msg.headers),
        ...(pulled.envelope === undefined ? { payload: Buffer.from(pulled.msg.data).toString('base64') } : {}),
      },
    };
    const subject = `${dlqPrefix}.${this.#token}.${pulled.topic}`;
    // Room for the headers NATS adds (Nats-Msg-Id) under the server's limit on a whole message.
    const maxBytes = (nc.info?.max_payload ?? 1_048_576) - 4_096;
    for (;;) {
      let refused: unknown;
      for (const json of deadLetterEncodings(record, pulled.msg.data, maxBytes)) {
        try {
          // One dead letter per (subscription, stream sequence): written twice after a crash, stored once.
          await js.publish(subject, Buffer.from(json), {
            msgID: `${this.#token}:${settings.stream}:${pulled.seq}`,
            timeout: settings.publishTimeoutMs,
          });
          return true;
        } catch (error) {
          refused = error;
          if (isUnavailable(error)) break; // the same again later; a refusal tries the next, smaller one
        }
      }
      this.#ctx.warn(
        `Subscription ${this.#spec.name}: could not write the dead letter of message ${envelope.id} (${pulled.topic}); retrying in ${settings.errorBackoffMs} ms`,
        refused,
      );
      if (!lane.active) return false;
      await new Promise((resolve) => setTimeout(resolve, settings.errorBackoffMs));
      if (!lane.active) return false;
    }
  }
}

/** A broker's attempt has no transaction of its own (with an outbox, src/outbox gives the handler one). */
const NO_TRANSACTION: AttemptScope<undefined> = Object.freeze({ tx: undefined, end: () => Promise.resolve(undefined) });

/**
 * Acknowledgements are fire-and-forget; nats.js throws synchronously once the connection is closed. A lost
 * ack only means a redelivery, and it must never escape a timer callback as an uncaught exception.
 */
function quietly(fn: () => void): void {
  try {
    fn();
  } catch {
    // see above
  }
}

/** What a dead letter records as the envelope of a message that could not be decoded. */
function undecodableEnvelope(pulled: Pulled, stream: string): Envelope {
  const text = Buffer.from(pulled.msg.data).toString('utf8');
  const id = header(pulled.msg.headers, 'ce-id') ?? `undecodable-${stream}-${pulled.seq}`;
  return {
    specversion: '1.0',
    id,
    source: header(pulled.msg.headers, 'ce-source') ?? 'nats://unknown',
    type: header(pulled.msg.headers, 'ce-type') ?? 'unknown',
    time: new Date().toISOString(),
    datacontenttype: 'application/json',
    topic: pulled.topic,
    partitionkey: header(pulled.msg.headers, 'ce-partitionkey') ?? id,
    correlationid: id,
    data: text,
  };
}
