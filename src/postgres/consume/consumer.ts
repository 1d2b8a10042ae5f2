import type { Consumer, DeliveryHandler, SubscriptionSpec } from '../../core/backbone.ts';
import type { PgTransaction } from '../transaction.ts';
import { Attempts } from './attempts.ts';
import { BatchHandler, splitBatch, type Acking } from './batch.ts';
import type { ConsumerContext } from './context.ts';
import { HeldKeys } from './held.ts';
import { cursorOf, LaneReader, windowOpen, type Lane, type LaneCursor } from './lanes.ts';
import { LeaseLost, Leases, TopicsChanged } from './leases.ts';
import { Gate } from './scopes.ts';

export type { ConsumerContext, ConsumerSettings } from './context.ts';

/**
 * One subscription's worker in this process: the loop that wires its parts. It holds leases on some of the
 * subscription's partitions (its lanes: leases.ts), reads all of them with one statement (lanes.ts),
 * handles the messages with up to `concurrency` keys in flight and acknowledges the batch with one more
 * (batch.ts, acknowledgement.ts), and retries held keys when they are due (held.ts).
 */
export class PostgresConsumer implements Consumer {
  readonly #ctx: ConsumerContext;
  readonly #spec: SubscriptionSpec;
  /** Held while a batch runs, so lanes change only between batches. */
  readonly #batchGate = new Gate();
  readonly #leases: Leases;
  readonly #reader: LaneReader;
  readonly #held: HeldKeys;
  readonly #batches: BatchHandler;
  #dirty = true;
  #stopping = false;
  #wakeUp: (() => void) | undefined;
  #loop: Promise<void> | undefined;
  #failures = 0;
  /** The last batch's handlers wrote through `ctx.tx`: the next batch is split into sub-batches (see splitBatch). */
  #wrote = false;
  /** The last batch's acknowledgement, still in flight while the next batch is handled (see #readAndHandle). */
  #acking: Acking | undefined;
  #unregister: (() => void) | undefined;

  constructor(ctx: ConsumerContext, spec: SubscriptionSpec, handle: DeliveryHandler<PgTransaction>) {
    this.#ctx = ctx;
    this.#spec = spec;
    this.#leases = new Leases(ctx, spec, {
      batchGate: this.#batchGate,
      settledAck: async () => {
        await this.#acking?.done.catch(() => undefined);
      },
      acquired: () => {
        this.#held.invalidate();
        this.#wake();
      },
      dropped: () => this.#held.invalidate(),
      stopping: () => this.#stopping,
    });
    const attempts = new Attempts(handle, spec, () => this.#stopping);
    this.#reader = new LaneReader(ctx, spec);
    this.#held = new HeldKeys(ctx, spec, this.#leases.owner, attempts);
    this.#batches = new BatchHandler(ctx, spec, this.#leases.owner, attempts, this.#held);
  }

  async start(): Promise<void> {
    const { notifier } = this.#ctx;
    const spec = this.#spec;
    await this.#leases.register();
    const stopWakes = notifier.register(spec.topics, () => this.#wake());
    const stopSignals = notifier.onSignal(`held:${spec.name}`, () => {
      // Held messages were added from outside (a redrive): learn the held keys again, retry what is due.
      this.#held.invalidate();
      this.#wake();
    });
    this.#unregister = () => {
      stopWakes();
      stopSignals();
    };
    // The reader's connections open and its read is planned while the leases are taken.
    this.#reader.warm();
    await this.#leases.start();
    this.#loop = this.#run();
  }

  async stop(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    this.#unregister?.();
    this.#wakeUp?.();
    await this.#loop;
    await this.#acking?.done.catch(() => undefined);
    await this.#reader.settle();
    await this.#leases.stop();
    await this.#leases.unregister();
  }

  #wake(): void {
    this.#dirty = true;
    this.#wakeUp?.();
  }

  async #run(): Promise<void> {
    const lanes = this.#leases.lanes;
    while (!this.#stopping) {
      let more = false;
      const release = await this.#batchGate.acquire();
      try {
        if (lanes.size > 0) {
          const retrying = this.#held.due;
          if (!this.#held.loaded || retrying) await this.#settled();
          if (!this.#held.loaded) await this.#held.load([...lanes.keys()]);
          if (retrying) await this.#held.retryDue([...lanes.values()]);
          const held = [...lanes.values()];
          if (this.#dirty || held.some(windowOpen)) {
            // Only a read that opens a window for every lane sees what was committed up to now. One that
            // goes on with an open window does not: a wake-up that came meanwhile waits for the next window,
            // or the last commits of a burst would wait for the backstop poll.
            if (!held.some(windowOpen)) this.#dirty = false;
            more = await this.#readAndHandle();
          }
        }
        // Idle only once the last acknowledgement has committed: if it failed, its batch is read again now.
        if (!more) await this.#settled();
        this.#failures = 0;
      } catch (error) {
        this.#dirty = true;
        this.#reader.forget();
        await this.#settled().catch(() => undefined);
        if (error instanceof LeaseLost) {
          const detail = "a partition's lease was lost during a batch; the batch is left to its new owner";
          this.#ctx.warn(`Subscription ${this.#spec.name}: ${detail}`);
          this.#ctx.observer?.emit('lease:lost', { subscription: this.#spec.name, backbone: 'postgres', detail });
          continue;
        }
        if (error instanceof TopicsChanged) {
          // The next heartbeat says who may hold them; till then, hold none (reading on would handle in vain).
          this.#ctx.warn(`Subscription ${this.#spec.name}: it gained a topic this worker has no handler for; its batch is left to workers that have one`);
          await this.#leases
            .release([...lanes.keys()])
            .catch((failure: unknown) => this.#ctx.warn(`Subscription ${this.#spec.name}: could not release partitions`, failure));
          continue;
        }
        this.#failures++;
        const delay = Math.min(this.#ctx.settings.errorBackoffMaxMs, 100 * 2 ** this.#failures);
        this.#ctx.warn(`Subscription ${this.#spec.name}: ${(error as Error).message}; retrying in ${delay} ms`, error);
        release();
        await this.#sleep(delay);
        continue;
      } finally {
        release();
      }
      if (!more) await this.#idle();
    }
  }

  /**
   * Waits for the in-flight acknowledgement. If it failed, the lanes go back to where they were before its
   * batch, whose messages are read again (no later acknowledgement was sent: each waits for the one before),
   * and the failure is thrown.
   */
  async #settled(): Promise<void> {
    const acking = this.#acking;
    if (acking === undefined) return;
    this.#acking = undefined;
    try {
      await acking.done;
    } catch (error) {
      for (const [lane, cursor] of acking.before) if (this.#leases.lanes.get(lane.partition) === lane) Object.assign(lane, cursor);
      this.#reader.forget();
      this.#dirty = true;
      throw error;
    }
  }

  async #idle(): Promise<void> {
    const { notifier, settings } = this.#ctx;
    const held = this.#leases.lanes.size > 0;
    // Without lanes there is nothing to read: wait for the heartbeat to acquire some (it wakes us).
    if (!held) this.#dirty = false;
    let wait = notifier.listening ? settings.pollMs : settings.fallbackPollMs;
    const untilDue = this.#held.untilDue;
    if (untilDue !== undefined && held) wait = Math.min(wait, untilDue);
    // Always through a timer, never a bare promise chain, so timers and I/O get their turn.
    if (this.#dirty || wait <= 0) wait = 0;
    const woken = this.#dirty;
    await this.#sleep(wait);
    if (!woken) this.#dirty = true;
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      // A zero wait yields through setImmediate: I/O gets its turn, without a timer's 1 ms minimum.
      const timer = ms > 0 ? setTimeout(done, ms) : setImmediate(done);
      function done() {
        if (ms > 0) clearTimeout(timer as NodeJS.Timeout);
        else clearImmediate(timer as NodeJS.Immediate);
        resolve();
      }
      this.#wakeUp = () => {
        this.#wakeUp = undefined;
        done();
      };
      if (this.#stopping) done();
    });
  }

  /**
   * Reads the next batch of every lane and handles it. Returns true if more is waiting.
   *
   * While a window stays open, the read of the next batch is sent as soon as this one's rows are in, so the
   * server scans it while this batch is handled and acknowledged (see LaneReader.prefetch).
   */
  async #readAndHandle(): Promise<boolean> {
    const spec = this.#spec;
    const lanes = [...this.#leases.lanes.values()];
    const previous = this.#acking;
    const received = this.#ctx.observer?.receiving('postgres', spec.name);
    const read = await this.#reader.next(lanes);
    received?.(read.rows, lanes.length === 1 ? lanes[0]!.partition : undefined);
    const { more, next } = read;
    const readAhead = more && !this.#ctx.driver.embedded && !this.#stopping ? this.#reader.prefetch(lanes, next, previous?.handled) : undefined;
    /** Lanes whose sub-batch failed: they stay where they were and read the same messages again. */
    const failed = new Set<number>();
    let failure: unknown;
    if (read.rows.length > 0) {
      const counts = new Map<number, number>();
      for (const partition of read.partitionOf.values()) counts.set(partition, (counts.get(partition) ?? 0) + 1);
      const parts = splitBatch(read, counts, spec.concurrency, this.#wrote ? this.#ctx.settings.handlerConnections : 1);
      // With another batch read ahead, a batch in one part whose handlers only acknowledge need not wait
      // for its acknowledgement: it commits while the next batch is handled (see BatchHandler).
      const overlap = readAhead !== undefined && parts.length === 1;
      const before = overlap ? lanes.map((lane): [Lane, LaneCursor] => [lane, cursorOf(lane)]) : [];
      const outcomes = await Promise.allSettled(parts.map((part) => this.#batches.handle({ read, part, counts, previous, overlap })));
      let wrote = false;
      let acking: Acking | undefined;
      for (const [index, outcome] of outcomes.entries()) {
        if (outcome.status === 'fulfilled') {
          wrote ||= outcome.value.wrote;
          if (readAhead !== undefined) for (const id of outcome.value.handled) readAhead.handledBefore.add(id);
          if (outcome.value.acking !== undefined) acking = { done: outcome.value.acking, before, handled: new Set(outcome.value.handled) };
          continue;
        }
        for (const lane of parts[index]!.lanes) failed.add(lane.partition);
        // A lost lease is only a warning: report a real error first, so the loop backs off.
        if (failure === undefined || failure instanceof LeaseLost) failure = outcome.reason;
      }
      this.#wrote = wrote || failure !== undefined;
      // Every part waited for the previous acknowledgement before sending its own: if none failed, it committed.
      if (failure === undefined) this.#acking = acking;
    }
    // Lanes with nothing to acknowledge move on in memory; their cursor is written with a later batch. The
    // lanes of sub-batches that committed move on even if another sub-batch failed: their acknowledgement
    // is in the database, and reading their messages again would handle them twice.
    for (const lane of lanes) {
      const moved = next.get(lane.partition);
      if (moved !== undefined && !failed.has(lane.partition) && this.#leases.lanes.get(lane.partition) === lane) Object.assign(lane, moved);
    }
    if (failure !== undefined) throw failure;
    this.#reader.keep(readAhead);
    return more;
  }
}
