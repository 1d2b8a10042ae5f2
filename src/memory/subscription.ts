import { AsyncResource } from 'node:async_hooks';
import { EVERY_TOPIC, type AttemptRecord, type Consumer, type DeliveryHandler, type SubscriptionSpec } from '../core/backbone.ts';
import { partitionOf, type Envelope } from '../core/envelope.ts';
import { runAttempts } from '../core/attempts.ts';
import type { Clock, ClockTimer } from '../core/clock.ts';
import { Deque } from './deque.ts';
import type { MemoryTransaction } from './transaction.ts';

/** A committed message, as the log keeps it: shared by every subscription, never mutated. */
export interface Stored {
  /** Commit order across the backbone (a dead letter's `position`). */
  readonly seq: number;
  readonly envelope: Envelope;
  /** The data as JSON: every delivery parses its own copy, as a real backbone would hand it over. */
  readonly json: string;
  readonly keyHash: number;
}

/** One message waiting in, or moving through, one subscription. */
export interface Entry {
  readonly message: Stored;
  /** Attempts made so far (a redrive starts again from 0, as PostgreSQL's does). */
  attempts: number;
  history: AttemptRecord[];
}

/** What a subscription needs from the backbone. */
export interface GroupContext {
  /** A transaction for one handler attempt. */
  begin(what: string): MemoryTransaction;
  /** Commits (true) or rolls back a handler attempt's transaction. */
  end(tx: MemoryTransaction, commit: boolean): void;
  deadLetter(subscription: string, entry: Entry, reason: string): void;
  /** The subscription may have become idle: drain() waiters look again. */
  settled(): void;
  /** The subscription's topics changed: publishes route by the new ones from now on. */
  retopic(): void;
  warn(message: string, error?: unknown): void;
  readonly maxInbox: number;
  /** The clock of delayed retries. */
  readonly clock: Clock;
}

/** Handlers started back to back before a worker yields to timers and I/O: all-synchronous handlers never would. */
const DISPATCHES_PER_TURN = 256;

/** The messages of one key in one subscription: handled one at a time, in commit order. */
class KeyLine {
  readonly pending = new Deque<Entry>();
  /** A message of this key is being handled. */
  busy = false;
  /** Queued in its lane's `ready` line. */
  ready = false;
  /** When the head's delayed retry is due (0: not waiting). The key's later messages wait behind it. */
  retryAt = 0;
  timer: ClockTimer | undefined;
  constructor(
    readonly key: string,
    readonly lane: Lane,
  ) {}
}

/** One partition of a subscription; a worker holds it while it runs. */
class Lane {
  readonly keys = new Map<string, KeyLine>();
  /** Keys with a message that can be handled now, in the order they became ready. */
  readonly ready = new Deque<KeyLine>();
  owner: MemoryWorker | undefined;
  constructor(readonly index: number) {}
}

/**
 * A subscription (consumer group) of the memory backbone. It outlives its workers, like PostgreSQL's
 * cursors do: what is published while none runs waits for the next one, and a message's attempts and
 * history survive a stop. Each worker (one `consume` call) holds some of its lanes; a key is marked busy
 * here, in the group, so a lane that moves between workers never runs two messages of one key at once.
 */
export class Group {
  readonly name: string;
  topics: readonly string[];
  readonly partitions: number;
  inbox: boolean;
  readonly #lanes: Lane[];
  readonly #workers: MemoryWorker[] = [];
  readonly #ctx: GroupContext;
  /** Handled message ids, oldest first (a Set iterates in insertion order), at most `maxInbox`. */
  readonly #handled = new Set<string>();
  /** Keys waiting for a delayed retry. */
  readonly #waiting = new Set<KeyLine>();
  /** Messages queued, in flight or waiting for a retry: drain() waits for 0. */
  outstanding = 0;
  /** The disagreement on topics last warned about (see #assignLanes). */
  #disagreement = '';

  constructor(spec: SubscriptionSpec, ctx: GroupContext) {
    this.name = spec.name;
    this.topics = [...spec.topics];
    this.partitions = spec.partitions;
    this.inbox = spec.inbox;
    this.#ctx = ctx;
    this.#lanes = Array.from({ length: spec.partitions }, (_, index) => new Lane(index));
  }

  get running(): boolean {
    return this.#workers.length > 0;
  }

  /** Messages of keys that wait for a delayed retry: counted in `outstanding`, but nothing runs them until it is due. */
  get waiting(): number {
    let messages = 0;
    for (const line of this.#waiting) messages += line.pending.length;
    return messages;
  }

  /** A committed message of one of this subscription's topics. */
  enqueue(message: Stored): void {
    const line = this.#line(message);
    line.pending.push({ message, attempts: 0, history: [] });
    this.outstanding++;
    this.#makeReady(line);
  }

  /**
   * Dead letters handed back, oldest first. A key not waiting for a retry handles them next, before what it
   * still has queued (they were published earlier); a key waiting for a retry queues them behind what it
   * holds. The same rule as PostgreSQL's redrive.
   */
  redrive(entries: readonly Entry[]): void {
    const byKey = new Map<KeyLine, Entry[]>();
    for (const entry of entries) {
      const line = this.#line(entry.message);
      const list = byKey.get(line);
      if (list === undefined) byKey.set(line, [entry]);
      else list.push(entry);
    }
    for (const [line, list] of byKey) {
      if (line.retryAt !== 0) for (const entry of list) line.pending.push(entry);
      else line.pending.unshift(...list);
      this.outstanding += list.length;
      this.#makeReady(line);
    }
  }

  handled(id: string): boolean {
    return this.#handled.has(id);
  }

  remember(id: string): void {
    if (this.#handled.has(id)) return;
    this.#handled.add(id);
    if (this.#handled.size > this.#ctx.maxInbox) {
      for (const oldest of this.#handled) {
        this.#handled.delete(oldest);
        break;
      }
    }
  }

  attach(worker: MemoryWorker): void {
    this.#workers.push(worker);
    this.#settleTopics();
    this.#assignLanes();
    if (this.#workers.length === 1) for (const line of this.#waiting) this.#arm(line);
  }

  detach(worker: MemoryWorker): void {
    const index = this.#workers.indexOf(worker);
    if (index === -1) return;
    this.#workers.splice(index, 1);
    this.#settleTopics();
    this.#assignLanes();
    // No worker left: retry timers would only wake nobody. They are armed again, for the time left, on attach.
    if (this.#workers.length === 0) {
      for (const line of this.#waiting) {
        this.#ctx.clock.clearTimeout(line.timer);
        line.timer = undefined;
      }
    }
    this.#ctx.settled();
  }

  /**
   * The subscription's topics are those its workers handle, as on PostgreSQL (statements.ts, `settle`): a
   * worker that starts with a new topic adds it; once no worker handles a topic it is no longer the
   * subscription's, and its messages still queued are dropped (PostgreSQL's readers skip them too).
   */
  #settleTopics(): void {
    if (this.#workers.length === 0) return;
    const topics = [...new Set(this.#workers.flatMap((worker) => worker.topics))].sort();
    const before = this.topics;
    if (topics.join('\n') === [...before].sort().join('\n')) return;
    this.topics = topics;
    this.#ctx.retopic();
    const gone = before.filter((topic) => !topics.includes(topic));
    if (gone.length > 0 && !topics.includes(EVERY_TOPIC)) this.#forget(new Set(gone));
  }

  #forget(topics: ReadonlySet<string>): void {
    for (const lane of this.#lanes) {
      for (const line of lane.keys.values()) {
        const kept = [...line.pending].filter((entry) => !topics.has(entry.message.envelope.topic));
        if (kept.length === line.pending.length) continue;
        this.outstanding -= line.pending.length - kept.length;
        while (line.pending.shift() !== undefined);
        for (const entry of kept) line.pending.push(entry);
        if (kept.length === 0 && line.retryAt !== 0) {
          this.#ctx.clock.clearTimeout(line.timer);
          line.retryAt = 0;
          this.#waiting.delete(line);
        }
        if (kept.length === 0 && !line.busy && !line.ready) lane.keys.delete(line.key);
      }
    }
    this.#ctx.settled();
  }

  /** A worker that lacks one of the subscription's topics would skip its messages: it holds no lane. */
  #able(worker: MemoryWorker): boolean {
    return worker.topics.includes(EVERY_TOPIC) || this.topics.every((topic) => worker.topics.includes(topic));
  }

  /** Lane i goes to able worker i mod n, so live workers hold lanes in turn, as PostgreSQL's leases balance. */
  #assignLanes(): void {
    for (const worker of this.#workers) worker.readyLanes.clear();
    const able = this.#workers.filter((worker) => this.#able(worker));
    const unable = this.#workers.filter((worker) => !this.#able(worker));
    const disagreement = unable.length === 0 ? '' : `${this.topics.join(',')}|${unable.length}|${able.length}`;
    if (disagreement !== this.#disagreement && disagreement !== '') {
      const lacking = unable.map((worker) => this.topics.filter((topic) => !worker.topics.includes(topic)).join(', ')).join('; ');
      this.#ctx.warn(
        `Subscription ${this.name}: its workers disagree on its topics (${this.topics.join(', ')}): ${unable.length} of them have no handler for ${lacking}. ` +
          (able.length === 0 ? 'No worker handles all of them, so every partition is held' : 'Their partitions go to the workers that handle all of them') +
          ". During a rolling deploy that adds or removes a handler this lasts until the old version's workers stop",
      );
    }
    this.#disagreement = disagreement;
    for (const lane of this.#lanes) {
      lane.owner = able.length === 0 ? undefined : able[lane.index % able.length];
      if (lane.owner !== undefined && lane.ready.length > 0) lane.owner.readyLanes.add(lane);
    }
    for (const worker of able) worker.schedule();
  }

  /** The next key a worker may handle from one of its lanes, marked busy, with its head message. */
  take(worker: MemoryWorker): { line: KeyLine; entry: Entry } | undefined {
    for (const lane of worker.readyLanes) {
      worker.readyLanes.delete(lane);
      const line = lane.ready.shift();
      // Round robin between lanes: one with more ready keys goes to the back of the worker's list.
      if (lane.ready.length > 0) worker.readyLanes.add(lane);
      if (line === undefined) continue;
      line.ready = false;
      const entry = line.pending.shift();
      if (entry === undefined) continue;
      line.busy = true;
      return { line, entry };
    }
    return undefined;
  }

  /**
   * A handling ended: `done` (acknowledged or dead-lettered), `wait` for a delayed retry (the key is
   * held), or `again` (the worker is stopping: another worker, or the next one, tries it).
   */
  release(line: KeyLine, entry: Entry, how: 'done' | 'wait' | 'again', delayMs = 0): void {
    line.busy = false;
    if (how === 'done') {
      this.outstanding--;
    } else {
      line.pending.unshift(entry);
      if (how === 'wait') {
        line.retryAt = this.#ctx.clock.now() + delayMs;
        this.#waiting.add(line);
        if (this.#workers.length > 0) this.#arm(line);
      }
    }
    if (line.retryAt === 0 && line.pending.length > 0) this.#makeReady(line);
    else if (line.retryAt === 0) line.lane.keys.delete(line.key);
    // Drain waiters look again: one that does not wait for retries may be done although messages wait.
    this.#ctx.settled();
  }

  /** Counts for drain()'s timeout message. */
  describe(): string {
    let queued = 0;
    let busy = 0;
    for (const lane of this.#lanes) {
      for (const line of lane.keys.values()) {
        queued += line.pending.length;
        if (line.busy) busy++;
      }
    }
    const waiting = this.#waiting.size;
    return `subscription ${this.name} has ${queued + busy} unhandled (${busy} in flight, ${waiting} key${waiting === 1 ? '' : 's'} waiting for a retry)`;
  }

  #line(message: Stored): KeyLine {
    const lane = this.#lanes[partitionOf(message.keyHash, this.partitions)]!;
    const key = message.envelope.partitionkey;
    let line = lane.keys.get(key);
    if (line === undefined) {
      line = new KeyLine(key, lane);
      lane.keys.set(key, line);
    }
    return line;
  }

  #makeReady(line: KeyLine): void {
    if (line.ready || line.busy || line.retryAt !== 0 || line.pending.length === 0) return;
    line.ready = true;
    const lane = line.lane;
    lane.ready.push(line);
    if (lane.ready.length === 1 && lane.owner !== undefined) {
      lane.owner.readyLanes.add(lane);
      lane.owner.schedule();
    }
  }

  #arm(line: KeyLine): void {
    this.#ctx.clock.clearTimeout(line.timer);
    line.timer = this.#ctx.clock.setTimeout(
      () => {
        line.timer = undefined;
        line.retryAt = 0;
        this.#waiting.delete(line);
        this.#makeReady(line);
      },
      Math.max(0, line.retryAt - this.#ctx.clock.now()),
    );
    // A retry waiting in memory must not keep a test process alive.
    line.timer.unref?.();
  }
}

/**
 * One `consume` call: handles the ready keys of the lanes it holds, up to `concurrency` at once, one
 * message per key at a time. Handlers start in the async context of the `consume` call, not in that of
 * whichever publisher or handler made their message ready.
 */
export class MemoryWorker implements Consumer {
  /** Lanes this worker holds that have a ready key, in round-robin order. */
  readonly readyLanes = new Set<Lane>();
  /** The topics this worker has handlers for. */
  readonly topics: readonly string[];
  readonly #group: Group;
  readonly #spec: SubscriptionSpec;
  readonly #handle: DeliveryHandler<MemoryTransaction>;
  readonly #ctx: GroupContext;
  readonly #scope = new AsyncResource('tidings.memory.worker');
  readonly #running = new Set<Promise<void>>();
  #inFlight = 0;
  #scheduled = false;
  #dispatched = 0;
  #stopping = false;
  #stopped: Promise<void> | undefined;

  constructor(group: Group, spec: SubscriptionSpec, handle: DeliveryHandler<MemoryTransaction>, ctx: GroupContext) {
    this.topics = spec.topics;
    this.#group = group;
    this.#spec = spec;
    this.#handle = handle;
    this.#ctx = ctx;
  }

  /** Pumps on a later turn of the event loop (coalesced). */
  schedule(): void {
    if (this.#scheduled || this.#stopping) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      this.#dispatched = 0;
      this.#scope.runInAsyncScope(() => this.#pump());
    });
  }

  #pump(): void {
    while (!this.#stopping && this.#inFlight < this.#spec.concurrency) {
      if (this.#dispatched >= DISPATCHES_PER_TURN) {
        this.schedule();
        return;
      }
      const next = this.#group.take(this);
      if (next === undefined) return;
      this.#dispatched++;
      this.#inFlight++;
      const running = this.#run(next.line, next.entry).catch((error: unknown) => {
        this.#ctx.warn(`Subscription ${this.#group.name}: internal error of the memory backbone while handling a message (a bug: please report it)`, error);
      });
      this.#running.add(running);
      void running.finally(() => this.#running.delete(running));
    }
  }

  /** Attempts the key's head until it is acknowledged, dead-lettered or must wait (core/attempts.ts); then frees the key. */
  async #run(line: KeyLine, entry: Entry): Promise<void> {
    const group = this.#group;
    let how: 'done' | 'wait' | 'again' = 'done';
    let delayMs = 0;
    try {
      const { envelope, json } = entry.message;
      // A redriven or re-published message this subscription already handled.
      if (group.inbox && group.handled(envelope.id)) return;
      const result = await runAttempts(this.#handle, {
        first: entry.attempts + 1,
        history: entry.history,
        retry: this.#spec.retry,
        // Each attempt parses its own copy of the data, as a real backbone would hand it over.
        envelope: () => ({ ...envelope, data: JSON.parse(json) as unknown }),
        open: (attempt) => {
          entry.attempts = attempt;
          const tx = this.#ctx.begin(`the transaction of attempt ${attempt} at message ${envelope.id} (${envelope.topic}) in subscription ${group.name}`);
          return {
            tx,
            end: async (keep) => {
              // The inbox record and what the handler published become visible together, as in one commit.
              if (keep && group.inbox) group.remember(envelope.id);
              this.#ctx.end(tx, keep);
              return undefined;
            },
          };
        },
        stopping: () => this.#stopping,
      });
      if (result.kind === 'dead') this.#ctx.deadLetter(group.name, entry, result.reason);
      else if (result.kind === 'retry' && result.delayMs > 0) {
        how = 'wait';
        delayMs = result.delayMs;
      } else if (result.kind === 'retry') how = 'again';
    } finally {
      this.#inFlight--;
      group.release(line, entry, how, delayMs);
      if (!this.#stopping) this.#pump();
    }
  }

  /** Graceful: takes no new message, lets those in flight finish, then hands its lanes to the other workers. */
  stop(): Promise<void> {
    this.#stopping = true;
    this.#stopped ??= (async () => {
      while (this.#running.size > 0) await Promise.allSettled([...this.#running]);
      this.#group.detach(this);
    })();
    return this.#stopped;
  }
}
