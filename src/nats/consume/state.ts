/** The state a NATS consumer's parts share: who this worker is, the buckets it holds, their messages and keys. */
import type { SubscriptionSpec } from '../../core/backbone.ts';
import type { Envelope } from '../../core/envelope.ts';
import type { AttemptRecord } from '../../core/errors.ts';
import type { NatsContext } from '../context.ts';
import type { Hold } from './holds.ts';
import type { Delivered, Puller } from './pull.ts';

/** One subscription's worker: what every part of its consumer reads. */
export interface WorkerContext {
  readonly nats: NatsContext;
  readonly spec: SubscriptionSpec;
  /** The subscription's name as a NATS name token (codec.ts nameToken). */
  readonly token: string;
  /** This worker's name: host, pid and a random suffix. */
  readonly owner: string;
  /** Unacknowledged messages per bucket consumer: concurrency x ackPendingPerHandler (JetStream max_ack_pending). */
  readonly maxPending: number;
}

/** The bucket's durable consumer. */
export function durableName(worker: WorkerContext, bucket: number): string {
  return `${worker.token}_${bucket}`;
}

/** The bucket's lease, in the leases bucket. */
export function leaseKey(worker: WorkerContext, bucket: number): string {
  return `${worker.token}.lease.${bucket}`;
}

/** This worker's announcement, in the leases bucket. */
export function workerKey(worker: WorkerContext): string {
  return `${worker.token}.worker.${worker.owner}`;
}

/** In the holds bucket (it does not expire): the topics of the subscription's last worker started. */
export function newestKey(worker: WorkerContext): string {
  return `${worker.token}.newest`;
}

/** Where a pulled message runs: see Pulled.where. */
type Where = 'here' | 'undecided' | 'waiting' | 'elsewhere';

/** A message this worker has pulled and not yet acknowledged (or handed back). */
export interface Pulled {
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
  where: Where;
  /** For an undecided message: the number of worker reads begun before it arrived (see topics.ts). */
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
export interface KeyLine {
  readonly queue: Pulled[];
  busy: boolean;
  retryTimer: NodeJS.Timeout | undefined;
}

/** A bucket this worker holds the lease of, and pulls from through its durable consumer. */
export interface Lane {
  readonly bucket: number;
  readonly puller: Puller;
  revision: number;
  /** When the last renewal of its lease was sent (or its creation): the lease is ours until leaseMs after. */
  renewedAt: number;
  active: boolean;
  readonly pulled: Map<number, Pulled>;
  /**
   * The stream sequences this lane acknowledged or terminated lately, oldest first, at most 2 x max_ack_pending
   * (see Outcomes.done): JetStream redelivers one whose acknowledgement reached it after its ack wait ran out.
   */
  readonly ended: Map<number, 'ack' | 'term'>;
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
  /**
   * Set while no handler may start in this lane: messages delivered to an earlier owner of the bucket and
   * not acknowledged when this lane took it (see leases.ts #acquire), until they come back or the timer ends.
   */
  earlier: { readonly count: number; readonly upTo: number; readonly seen: Set<number>; readonly timer: NodeJS.Timeout } | undefined;
  /** When the holds loaded with the bucket whose message never came back are given up (see leases.ts). */
  staleTimer: NodeJS.Timeout | undefined;
  /** While tracing: what arrived since the last pull ended, for its receive span (pulling.ts). */
  arrived: Envelope[] | undefined;
}

/** A lane just acquired: nothing pulled yet. */
export function newLane(bucket: number, puller: Puller, revision: number, renewedAt: number, nextDelivery: number): Lane {
  return {
    bucket,
    puller,
    revision,
    renewedAt,
    active: true,
    pulled: new Map(),
    ended: new Map(),
    keys: new Map(),
    holds: new Map(),
    running: new Set(),
    loop: undefined,
    wakeLoop: undefined,
    released: undefined,
    nextDelivery,
    gapTimer: undefined,
    earlier: undefined,
    staleTimer: undefined,
    arrived: undefined,
  };
}

/**
 * Whether the lane's lease is surely still ours: renewed less than leaseMs - heartbeatMs ago (the margin a
 * renewal that fails is given too, leases.ts). A process stalled for longer (a loaded machine) may have lost
 * it to another worker without knowing yet: it starts no handler there until a renewal succeeds, so two
 * workers never start handlers of one key at once.
 */
export function leaseFresh(worker: WorkerContext, lane: Lane): boolean {
  const { leaseMs, heartbeatMs } = worker.nats.settings;
  return Date.now() - lane.renewedAt < leaseMs - heartbeatMs;
}

/** Whether the lane waits for deliveries that went astray or to an earlier owner: no handler starts there. */
export function laneHeld(lane: Lane): boolean {
  return lane.gapTimer !== undefined || lane.earlier !== undefined;
}

/** Runs `task` as part of the lane's work: a release waits for it. */
export function runInLane(lane: Lane, task: Promise<void>): void {
  lane.running.add(task);
  void task.finally(() => lane.running.delete(task));
}

/**
 * Acknowledgements are fire-and-forget; nats.js throws synchronously once the connection is closed. A lost
 * ack only means a redelivery, and it must never escape a timer callback as an uncaught exception.
 */
export function quietly(fn: () => void): void {
  try {
    fn();
  } catch {
    // see above
  }
}
