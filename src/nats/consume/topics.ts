/**
 * Deciding who runs a message whose topic this worker has no handler for (workers.ts): a read of the
 * subscription's live workers made after it arrived says whether the topic is the subscription's and who
 * handles it. Until then its key waits; a topic no live worker handles waits here, decided again at each
 * heartbeat.
 */
import { readEntries } from '../kv.ts';
import { announcement, readAnnouncement, WorkerView, type LiveWorker } from './workers.ts';
import type { KeyRunner } from './keys.ts';
import type { Outcomes } from './outcomes.ts';
import { newestKey, runInLane, type Lane, type Pulled, type WorkerContext } from './state.ts';
import { header } from '../codec.ts';

/** What deciding asks of the rest of the consumer. */
interface TopicHooks {
  /** Gives the lane's bucket up and keeps off it for a lease's time: a live worker handles what this one cannot. */
  decline(lane: Lane): void;
  stopping(): boolean;
}

export class TopicDecider {
  readonly #worker: WorkerContext;
  readonly #runner: KeyRunner;
  readonly #outcomes: Outcomes;
  readonly #hooks: TopicHooks;
  /** Messages of topics this worker has no handler for, until a read of the workers decides them. */
  readonly #undecided = new Map<Pulled, Lane>();
  /** Messages of the subscription's topics that no live worker handles, decided again at each heartbeat. */
  readonly #waiting = new Map<Pulled, Lane>();
  /** The topics whose messages wait for a worker that handles them, warned about once. */
  readonly #unhandled = new Set<string>();
  /** Reads of the live workers begun so far, and the one asked for by undecided messages, if running. */
  #reads = 0;
  #asking: Promise<void> | undefined;

  constructor(worker: WorkerContext, runner: KeyRunner, outcomes: Outcomes, hooks: TopicHooks) {
    this.#worker = worker;
    this.#runner = runner;
    this.#outcomes = outcomes;
    this.#hooks = hooks;
  }

  /** Reads of the live workers begun so far: a message that arrives now is decided by a later one. */
  get reads(): number {
    return this.#reads;
  }

  /** The read asked for by undecided messages, if one runs: stopping waits for it. */
  get asking(): Promise<void> | undefined {
    return this.#asking;
  }

  /**
   * Another subscription's topic, or one of this subscription's that another live worker handles: only a
   * read of the live workers made after it arrived can tell (a worker started a moment ago may handle it).
   * Its key waits meanwhile.
   */
  undecided(pulled: Pulled, lane: Lane): void {
    this.#undecided.set(pulled, lane);
    this.#askWorkers();
  }

  /** The message is handed back (its bucket released): nothing decides it any more. */
  forget(pulled: Pulled): void {
    this.#undecided.delete(pulled);
    this.#waiting.delete(pulled);
  }

  /** The live workers of the subscription, its newest worker and what they handle, read now; decides messages. */
  async readWorkers(): Promise<WorkerView> {
    const { nats, token, owner, spec } = this.#worker;
    const read = ++this.#reads;
    const prefix = `${token}.worker.`;
    const [entries, newestEntry] = await Promise.all([
      readEntries(nats.jsm, nats.leases, nats.leasesBucket, `${prefix}*`),
      nats.holds.get(newestKey(this.#worker)),
    ]);
    const workers = entries.map((entry) => readAnnouncement(entry.key.slice(prefix.length), entry.string()));
    if (!workers.some((worker) => worker.owner === owner)) workers.push(readAnnouncement(owner, announcement(spec.topics)));
    let newest: LiveWorker | undefined;
    if (newestEntry !== null && newestEntry.operation === 'PUT') {
      const { owner: newestOwner, announcement: topics } = newestEntry.json<{ owner: string; announcement: string }>();
      newest = readAnnouncement(newestOwner, topics);
    }
    const view = new WorkerView(workers, newest);
    this.#decide(view, read);
    return view;
  }

  /** Reads the live workers for the undecided messages, one read at a time, again while any arrived during one. */
  #askWorkers(): void {
    if (this.#asking !== undefined || this.#hooks.stopping()) return;
    const { nats, spec } = this.#worker;
    this.#asking = this.readWorkers()
      .then(
        () => undefined,
        async (error: unknown) => {
          nats.warn(`Subscription ${spec.name}: could not read its live workers; retrying in ${nats.settings.errorBackoffMs} ms`, error);
          await new Promise((resolve) => setTimeout(resolve, nats.settings.errorBackoffMs));
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
    const { nats, spec, owner } = this.#worker;
    for (const [pulled, lane] of [...this.#undecided, ...this.#waiting]) {
      if (pulled.where === 'undecided' && pulled.readsBefore >= read) continue;
      this.forget(pulled);
      if (!lane.active || lane.pulled.get(pulled.seq) !== pulled) continue; // handed back meanwhile
      const handlers = view.handlersOf(pulled.topic);
      if (view.has(pulled.topic) && handlers.length === 0) {
        pulled.where = 'waiting';
        this.#waiting.set(pulled, lane);
        if (!this.#unhandled.has(pulled.topic)) {
          this.#unhandled.add(pulled.topic);
          nats.warn(
            `Subscription ${spec.name}: topic ${pulled.topic} is its newest worker's (${view.newest?.owner}), but no live worker handles it; ` +
              `its messages wait in the buckets worker ${owner} holds, and their keys with them, until a worker that handles it runs again (or a newer worker without it starts)`,
          );
        }
        continue;
      }
      this.#unhandled.delete(pulled.topic);
      if (handlers.length === 0) {
        const line = lane.keys.get(pulled.key)!;
        if (pulled.hold === undefined) {
          this.#outcomes.done(lane, line, pulled, 'ack');
          this.#runner.pump(lane, pulled.key, line);
        } else {
          // Its topic's handlers are gone while it waited for a retry: its hold goes first.
          runInLane(
            lane,
            this.#outcomes.finish(lane, line, pulled, 'ack').then(() => this.#runner.pump(lane, pulled.key, line)),
          );
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
    this.#worker.nats.warn(
      `Subscription ${this.#worker.spec.name}: worker ${this.#worker.owner} has no handler for topic ${pulled.topic} (message ${id}, bucket ${lane.bucket}), which ${handlers.join(', ')} handle${handlers.length === 1 ? 's' : ''}; ` +
        `it leaves the message and its key to ${handlers.length === 1 ? 'it' : 'them'} and gives bucket ${lane.bucket} up`,
    );
    this.#hooks.decline(lane);
  }
}
