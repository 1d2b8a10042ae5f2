/**
 * Running a bucket's keys: the head of each key's line runs when its key is free, its delayed retry is due
 * and the bucket is not on hold, up to `concurrency` handlers at once across the worker's buckets. The
 * attempts are core's loop (core/attempts.ts); a delayed retry writes the message's durable hold first.
 */
import type { AttemptScope } from '../../core/attempts.ts';
import { runAttempts } from '../../core/attempts.ts';
import type { DeliveryHandler } from '../../core/backbone.ts';
import { describeError, TidingsError } from '../../core/errors.ts';
import type { Holds } from './holds.ts';
import type { Outcomes } from './outcomes.ts';
import { laneHeld, leaseFresh, type KeyLine, type Lane, type Pulled, type WorkerContext } from './state.ts';

/** A broker's attempt has no transaction of its own (with an outbox, src/outbox gives the handler one). */
const NO_TRANSACTION: AttemptScope<undefined> = Object.freeze({ tx: undefined, end: () => Promise.resolve(undefined) });

export class KeyRunner {
  readonly #worker: WorkerContext;
  readonly #handle: DeliveryHandler<undefined>;
  readonly #holds: Holds;
  readonly #outcomes: Outcomes;
  /** Handlers running in this process, across lanes, at most `concurrency`. */
  #inFlight = 0;
  readonly #slotWaiters: Array<() => void> = [];

  constructor(worker: WorkerContext, handle: DeliveryHandler<undefined>, holds: Holds, outcomes: Outcomes) {
    this.#worker = worker;
    this.#handle = handle;
    this.#holds = holds;
    this.#outcomes = outcomes;
  }

  /** Starts the key's first message if it may run now; arms its retry timer if it waits for a delayed retry. */
  pump(lane: Lane, key: string, line: KeyLine): void {
    if (line.busy || line.retryTimer !== undefined || !lane.active || laneHeld(lane)) return;
    if (!leaseFresh(this.#worker, lane)) return; // the next renewal pumps the lane again (leases.ts)
    const head = line.queue[0];
    if (head === undefined && lane.keys.get(key) === line) lane.keys.delete(key); // emptied by topics.ts
    if (head === undefined || head.where !== 'here') return;
    // A held message of this key has not come back yet: it runs first.
    const hold = lane.holds.get(key);
    if (hold !== undefined && hold.seq !== head.seq) return;
    const wait = head.dueAt - Date.now();
    if (wait > 0) {
      // The key waits here, its later messages unacknowledged behind it and kept alive; other keys flow.
      line.retryTimer = setTimeout(() => {
        line.retryTimer = undefined;
        this.pump(lane, key, line);
      }, wait);
      return;
    }
    line.busy = true;
    const run = this.#runHead(lane, line).catch((error: unknown) => {
      this.#worker.nats.warn(`Subscription ${this.#worker.spec.name}: unexpected failure handling bucket ${lane.bucket}`, error);
    });
    lane.running.add(run);
    void run.finally(() => {
      lane.running.delete(run);
      line.busy = false;
      if (line.queue.length === 0 && line.retryTimer === undefined) lane.keys.delete(key);
      else this.pump(lane, key, line);
    });
  }

  /** Every key of the lane that may run. */
  pumpAll(lane: Lane): void {
    for (const [key, line] of lane.keys) this.pump(lane, key, line);
  }

  async #slot(): Promise<void> {
    if (this.#inFlight < this.#worker.spec.concurrency) {
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
      if (head === undefined || !lane.active || laneHeld(lane) || !leaseFresh(this.#worker, lane)) return;
      if (head.envelope === undefined) {
        const reason = `UNDECODABLE_MESSAGE: the message at subject ${head.subject}, stream ${this.#worker.nats.settings.stream} sequence ${head.seq}, cannot be decoded: ${head.problem}`;
        const error = describeError(new TidingsError('UNDECODABLE_MESSAGE', reason, { ref: { topic: head.topic } }));
        head.history.push({ attempt: head.earlier + 1, at: new Date().toISOString(), error });
        if (await this.#outcomes.deadLetter(lane, head, reason)) await this.#outcomes.finish(lane, line, head, 'term');
        return;
      }
      const envelope = head.envelope;
      const result = await runAttempts(this.#handle, {
        first: head.earlier + head.attempts + 1,
        history: head.history,
        retry: this.#worker.spec.retry,
        envelope: () => envelope,
        open: (attempt) => {
          head.attempts = attempt - head.earlier;
          return NO_TRANSACTION;
        },
        stopping: () => !lane.active,
      });
      if (result.kind === 'ack') {
        if (head.hold === undefined) this.#outcomes.done(lane, line, head, 'ack');
        else await this.#outcomes.finish(lane, line, head, 'ack');
      } else if (result.kind === 'dead') {
        if (await this.#outcomes.deadLetter(lane, head, result.reason)) await this.#outcomes.finish(lane, line, head, 'term');
      } else {
        // pump starts the wait once this returns; the hold makes it outlive this worker.
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
      this.#worker.nats.warn(
        `Subscription ${this.#worker.spec.name}: could not write the hold of message ${envelope.id} (${pulled.topic}, key ${pulled.key}); it waits for its retry in this worker only, so a crash before then loses the time left and the attempt history`,
        error,
      );
    }
  }
}
