import { hostname } from 'node:os';
import type { Consumer, DeliveryHandler, SubscriptionSpec } from '../../core/backbone.ts';
import { nameToken } from '../codec.ts';
import type { NatsContext } from '../context.ts';
import { Holds } from './holds.ts';
import { announcement } from './workers.ts';
import { ensureDurable } from './durables.ts';
import { KeyRunner } from './keys.ts';
import { BucketLeases } from './leases.ts';
import { Outcomes } from './outcomes.ts';
import { LanePulling } from './pulling.ts';
import { newestKey, quietly, workerKey, type WorkerContext } from './state.ts';
import { TopicDecider } from './topics.ts';

/**
 * One subscription's worker in this process: the loop that wires its parts. The stream's subjects are split
 * into buckets by key hash; the subscription has one durable pull consumer per bucket (durables.ts), and a
 * bucket is pulled by one worker at a time, the holder of its lease in the stream's KV bucket (leases.ts).
 * So a key's messages reach one process, in stream order (pulling.ts), and this worker runs them one at a
 * time per key, up to `concurrency` keys at once (keys.ts), and acknowledges, terminates or holds them
 * (outcomes.ts, holds.ts). A message of a topic it has no handler for waits for a read of the live workers
 * (topics.ts).
 *
 * Leases: each worker announces itself and the topics it handles (`<subscription>.worker.<id>`, renewed
 * every heartbeat, expiring with the KV bucket's TTL). The buckets are shared by the workers that handle
 * every topic of the subscription (workers.ts): ceil(buckets / those workers) leases each
 * (`<subscription>.lease.<bucket>`), renewed by compare-and-set on their revision. A worker that gives a
 * bucket up finishes what runs, hands the rest back with a nak in stream order (JetStream redelivers before
 * anything newer), then deletes the lease. A worker that dies stops renewing; leaseMs > ackWaitMs +
 * heartbeatMs guarantees its messages are back in JetStream's redelivery queue before another worker takes
 * the bucket, and its delayed retries' holds (holds.ts) are read by that worker before it runs anything. One
 * that only stalled past its lease may still be served its pull requests: the next owner starts nothing
 * until the messages unacknowledged when it took the bucket came back (pulling.ts awaitEarlier), and the
 * stalled one starts no handler once its lease may have lapsed (state.ts leaseFresh).
 */
export class NatsConsumer implements Consumer {
  readonly #worker: WorkerContext;
  readonly #outcomes: Outcomes;
  readonly #topics: TopicDecider;
  readonly #leases: BucketLeases;
  #stopping = false;
  #timer: NodeJS.Timeout | undefined;
  #keepAlive: NodeJS.Timeout | undefined;
  #beating: Promise<void> | undefined;

  constructor(ctx: NatsContext, spec: SubscriptionSpec, handle: DeliveryHandler<undefined>) {
    const token = nameToken(spec.name);
    this.#worker = {
      nats: ctx,
      spec,
      token,
      owner: `${hostname().replace(/[^\w-]/g, '_')}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`,
      maxPending: spec.concurrency * ctx.settings.ackPendingPerHandler,
    };
    const holds = new Holds(ctx.holds, ctx.jsm, ctx.holdsBucket, token);
    this.#outcomes = new Outcomes(this.#worker, holds);
    const runner = new KeyRunner(this.#worker, handle, holds, this.#outcomes);
    this.#topics = new TopicDecider(this.#worker, runner, this.#outcomes, {
      decline: (lane) => {
        this.#leases.decline(lane);
        this.#beat();
      },
      stopping: () => this.#stopping,
    });
    const pulling = new LanePulling(this.#worker, runner, this.#topics);
    this.#leases = new BucketLeases(this.#worker, { pulling, runner, outcomes: this.#outcomes, topics: this.#topics, holds }, () => this.#stopping);
  }

  async start(): Promise<void> {
    const { nats, spec, owner } = this.#worker;
    const { settings } = nats;
    await Promise.all(Array.from({ length: settings.buckets }, (_, bucket) => ensureDurable(this.#worker, bucket)));
    await nats.holds.put(newestKey(this.#worker), JSON.stringify({ owner, announcement: announcement(spec.topics) }));
    await this.#leases.heartbeat();
    this.#timer = setInterval(() => this.#beat(), settings.heartbeatMs);
    this.#keepAlive = setInterval(() => this.#touch(), Math.max(100, Math.floor(settings.ackWaitMs / 3)));
  }

  /** A heartbeat now, unless one runs. */
  #beat(): void {
    this.#beating ??= this.#leases
      .heartbeat()
      .catch((error: unknown) => this.#worker.nats.warn(`Subscription ${this.#worker.spec.name}: heartbeat failed; retrying`, error))
      .finally(() => {
        this.#beating = undefined;
      });
  }

  async stop(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    clearInterval(this.#timer);
    await this.#beating?.catch(() => undefined);
    await this.#leases.releaseAll();
    await this.#topics.asking?.catch(() => undefined);
    clearInterval(this.#keepAlive);
    await this.#worker.nats.leases.delete(workerKey(this.#worker)).catch(() => undefined);
  }

  /** JetStream redelivers after ackWaitMs; a message held here (running, queued, waiting to retry) is kept alive. */
  #touch(): void {
    const now = Date.now();
    const every = this.#worker.nats.settings.ackWaitMs / 3;
    for (const lane of this.#leases.lanes.values()) {
      for (const pulled of lane.pulled.values()) {
        if (now - pulled.touchedAt < every) continue;
        quietly(() => pulled.msg.working());
        pulled.touchedAt = now;
      }
    }
  }
}
