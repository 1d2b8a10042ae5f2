/**
 * Publishing on the memory backbone: committed messages are appended to one log in commit order, and a
 * reference to each goes into the queue of every subscription of its topic (by lane and key), in O(1) per
 * message. A message due later waits in a timer and is committed then, entering its key's order at its due time.
 */
import { EVERY_TOPIC, type Outgoing } from '../core/backbone.ts';
import type { ClockTimer } from '../core/clock.ts';
import type { Envelope } from '../core/envelope.ts';
import type { Group } from './consume/group.ts';
import type { Stored } from './consume/state.ts';
import { Deque } from './deque.ts';
import type { MemorySettings } from './options.ts';

export class MemoryPublisher {
  readonly #settings: MemorySettings;
  readonly #log = new Deque<Stored>();
  /** Messages forgotten by the log (maxLog). */
  #forgotten = 0;
  #seq = 0;
  /** Subscriptions by topic, and those of every topic: a publish finds its subscriptions in O(1). */
  readonly #byTopic = new Map<string, Group[]>();
  #everyTopic: Group[] = [];
  /** Messages scheduled for later, by id, waiting in their timers. */
  readonly #scheduled = new Map<string, ClockTimer>();

  constructor(settings: MemorySettings) {
    this.#settings = settings;
  }

  /** Appends to the log in commit order and hands each message to the subscriptions of its topic. */
  commit(messages: readonly Outgoing[]): void {
    const { clock } = this.#settings;
    for (const message of messages) {
      if (message.dueAt !== undefined && message.dueAt > clock.now()) this.#later(message);
      else this.#append(message);
    }
  }

  /** Cancels a scheduled message not yet due: true if it was waiting. */
  cancel(id: string): boolean {
    const waiting = this.#scheduled.get(id);
    if (waiting === undefined) return false;
    this.#settings.clock.clearTimeout(waiting);
    this.#scheduled.delete(id);
    return true;
  }

  /** The committed messages still kept, oldest first, each with its own copy of the data; only `topic`'s if given. */
  messages(topic?: string): Envelope[] {
    const found: Envelope[] = [];
    for (const stored of this.#log) {
      if (topic === undefined || stored.envelope.topic === topic) found.push({ ...stored.envelope, data: JSON.parse(stored.json) as unknown });
    }
    return found;
  }

  #later(message: Outgoing): void {
    const { id } = message.envelope;
    // The same id scheduled twice (a retried publish) is one message, as on PostgreSQL.
    if (this.#scheduled.has(id)) return;
    this.#wait(message);
  }

  /**
   * Commits `message` at its due time. Node's timers run on a clock of their own, which can fire one a
   * millisecond before the wall clock reaches it (CI saw a message handled 1 ms early): then it waits the rest.
   */
  #wait(message: Outgoing): void {
    const { clock } = this.#settings;
    const { id } = message.envelope;
    const timer = clock.setTimeout(() => {
      if (clock.now() < message.dueAt!) return this.#wait(message);
      this.#scheduled.delete(id);
      this.#append(message);
    }, message.dueAt! - clock.now());
    // A scheduled message must not keep a test process alive.
    timer.unref?.();
    this.#scheduled.set(id, timer);
  }

  #append({ envelope, json, keyHash }: Outgoing): void {
    const { maxLog } = this.#settings;
    const stored: Stored = { seq: ++this.#seq, envelope, json, keyHash };
    if (maxLog > 0) {
      this.#log.push(stored);
      if (this.#log.length > maxLog) {
        this.#log.shift();
        this.#forgotten++;
      }
    } else {
      this.#forgotten++;
    }
    const groups = this.#byTopic.get(envelope.topic);
    if (groups !== undefined) for (const group of groups) group.enqueue(stored);
    for (const group of this.#everyTopic) group.enqueue(stored);
  }

  /** A subscription that starts from the beginning gets the messages the log still keeps. */
  replay(group: Group): void {
    if (this.#forgotten > 0) {
      this.#settings.warn(
        `Subscription ${group.name} starts from the beginning, but the memory backbone has forgotten its ${this.#forgotten} oldest message${this.#forgotten === 1 ? '' : 's'} (it keeps maxLog = ${this.#settings.maxLog}); it starts at the oldest kept`,
      );
    }
    const every = group.topics.includes(EVERY_TOPIC);
    const topics = new Set(group.topics);
    for (const stored of this.#log) if (every || topics.has(stored.envelope.topic)) group.enqueue(stored);
  }

  /** The subscriptions or their topics changed: publishes route by the new ones from now on. */
  route(groups: Iterable<Group>): void {
    this.#byTopic.clear();
    this.#everyTopic = [];
    for (const group of groups) {
      if (group.topics.includes(EVERY_TOPIC)) {
        this.#everyTopic.push(group);
        continue;
      }
      for (const topic of new Set(group.topics)) {
        const list = this.#byTopic.get(topic);
        if (list === undefined) this.#byTopic.set(topic, [group]);
        else list.push(group);
      }
    }
  }
}
