import { EVERY_TOPIC, type SubscriptionSpec } from '../../core/backbone.ts';
import { partitionOf } from '../../core/envelope.ts';
import type { TenantSlots } from './fair.ts';
import { KeyLine, Lane, type Entry, type GroupContext, type LaneHolder, type Stored } from './state.ts';

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
  readonly #workers: LaneHolder[] = [];
  readonly #ctx: GroupContext;
  /** Handled message ids, oldest first (a Set iterates in insertion order), at most `maxInbox`. */
  readonly #handled = new Set<string>();
  /** Keys waiting for a delayed retry. */
  readonly #waiting = new Set<KeyLine>();
  /** Messages queued, in flight or waiting for a retry: drain() waits for 0. */
  outstanding = 0;
  /** The disagreement on topics last warned about (see #assignLanes). */
  #disagreement = '';
  /** Ready keys are kept by tenant, for workers that share their slots between tenants (fair.ts). */
  readonly #byTenant: boolean;

  constructor(spec: SubscriptionSpec, ctx: GroupContext) {
    this.name = spec.name;
    this.topics = [...spec.topics];
    this.partitions = spec.partitions;
    this.inbox = spec.inbox;
    this.#byTenant = spec.tenantShares !== undefined;
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

  attach(worker: LaneHolder): void {
    this.#workers.push(worker);
    this.#settleTopics();
    this.#assignLanes();
    if (this.#workers.length === 1) for (const line of this.#waiting) this.#arm(line);
  }

  detach(worker: LaneHolder): void {
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
  #able(worker: LaneHolder): boolean {
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

  /**
   * The next key a worker may handle from one of its lanes, marked busy, with its head message: the lanes in
   * turn, or with `slots` the key of the tenant furthest behind its share, among those under their cap.
   */
  take(worker: LaneHolder, slots?: TenantSlots): { line: KeyLine; entry: Entry } | undefined {
    for (;;) {
      let lane: Lane | undefined;
      let tenant: string | undefined;
      if (slots === undefined || !this.#byTenant) lane = worker.readyLanes.values().next().value;
      else {
        let best = Number.POSITIVE_INFINITY;
        for (const candidate of worker.readyLanes) {
          for (const name of candidate.ready.tenants()) {
            const priority = slots.priority(name);
            if (priority !== undefined && priority < best) [best, lane, tenant] = [priority, candidate, name];
          }
        }
      }
      // None, or every tenant with a ready key is at its cap: a key that ends makes room.
      if (lane === undefined) return undefined;
      worker.readyLanes.delete(lane);
      const line = lane.ready.shift(tenant);
      // Round robin between lanes: one with more ready keys goes to the back of the worker's list.
      if (lane.ready.length > 0) worker.readyLanes.add(lane);
      if (line === undefined) continue;
      line.ready = false;
      const entry = line.pending.shift();
      if (entry === undefined) continue;
      line.busy = true;
      return { line, entry };
    }
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
    lane.ready.push(this.#byTenant ? (line.pending.peek()!.message.envelope.tenant ?? '') : '', line);
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
