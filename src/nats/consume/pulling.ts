/**
 * Pulling a held bucket and lining up what arrives: each message joins its key's line in stream order; a
 * gap in the consumer's delivery numbers holds the bucket until JetStream redelivers what never arrived.
 */
import { EVERY_TOPIC } from '../../core/backbone.ts';
import { decode, headerFields, REDRIVE_FOR } from '../codec.ts';
import type { Delivered } from './pull.ts';
import type { KeyRunner } from './keys.ts';
import { quietly, type Lane, type Pulled, type WorkerContext } from './state.ts';
import type { TopicDecider } from './topics.ts';

export class LanePulling {
  readonly #worker: WorkerContext;
  readonly #runner: KeyRunner;
  readonly #topics: TopicDecider;
  readonly #everyTopic: boolean;
  readonly #handled: ReadonlySet<string>;

  constructor(worker: WorkerContext, runner: KeyRunner, topics: TopicDecider) {
    this.#worker = worker;
    this.#runner = runner;
    this.#topics = topics;
    this.#everyTopic = worker.spec.topics.includes(EVERY_TOPIC);
    this.#handled = new Set(worker.spec.topics);
  }

  /**
   * Pulls while the lane is active, never more than max_ack_pending in memory. A pull is never abandoned
   * half way: what JetStream sends for it is received, so nothing sits unseen in the client when the
   * bucket changes hands.
   */
  async pull(lane: Lane): Promise<void> {
    const { nats, spec, maxPending } = this.#worker;
    const { settings } = nats;
    let failures = 0;
    while (lane.active) {
      const room = maxPending - lane.pulled.size;
      if (room <= 0) {
        await pause(lane, settings.fetchExpiresMs);
        continue;
      }
      const received = nats.observer?.()?.receiving('nats', spec.name);
      if (received !== undefined) lane.arrived ??= [];
      try {
        await lane.puller.pull(Math.min(room, spec.batchSize), settings.fetchExpiresMs);
        received?.(lane.arrived!.splice(0), lane.bucket);
        failures = 0;
      } catch (error) {
        if (!lane.active) break;
        failures++;
        const wait = Math.min(settings.errorBackoffMs * 2 ** Math.min(failures, 5), 10_000) || 100;
        nats.warn(`Subscription ${spec.name}: pulling bucket ${lane.bucket} failed; retrying in ${wait} ms`, error);
        await pause(lane, wait);
      }
    }
  }

  /** A delivery of the lane's consumer: lined up behind its key, or decided first if its topic is not handled here. */
  receive(lane: Lane, msg: Delivered): void {
    const seq = msg.seq;
    const known = lane.pulled.get(seq);
    if (msg.deliverySeq > lane.nextDelivery) this.#holdBucket(lane, msg.deliverySeq - lane.nextDelivery);
    const earlier = lane.earlier;
    if (earlier !== undefined && msg.deliveries > 1 && seq <= earlier.upTo) {
      earlier.seen.add(seq);
      if (earlier.seen.size >= earlier.count) this.#endEarlier(lane);
    }
    lane.nextDelivery = Math.max(lane.nextDelivery, msg.deliverySeq + 1);
    if (known !== undefined) {
      // Redelivered while we still hold it (its ack wait ran out): keep one copy, answer the newest delivery.
      known.msg = msg;
      known.touchedAt = Date.now();
      return;
    }
    const ended = lane.ended.get(seq);
    if (ended !== undefined) {
      // Handled and ended here already; its acknowledgement arrived after the ack wait (see Outcomes.done).
      quietly(() => (ended === 'ack' ? msg.ack() : msg.term()));
      return;
    }
    const { settings } = this.#worker.nats;
    // The bucket's consumer reads `<prefix>.<bucket>.>` only (the stream takes nothing else): the rest is the topic.
    const topic = msg.subject.slice(settings.subjectPrefix.length + String(lane.bucket).length + 2);
    const fields = headerFields(msg.headers);
    const redriveFor = fields.get(REDRIVE_FOR);
    if (redriveFor !== undefined && redriveFor !== this.#worker.spec.name) {
      quietly(() => msg.ack()); // a redrive meant for another subscription
      return;
    }
    const here = this.#everyTopic || this.#handled.has(topic);
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
      readsBefore: this.#topics.reads,
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
    if (pulled.envelope !== undefined) lane.arrived?.push(pulled.envelope);
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
    if (pulled.where === 'undecided') this.#topics.undecided(pulled, lane);
    this.#runner.pump(lane, pulled.key, line);
  }

  /**
   * The bucket's consumer had `count` messages delivered and not acknowledged (stream sequences up to `upTo`)
   * when this lane took it: an earlier owner's. One that died or gave the bucket up has them back in JetStream
   * already; one whose lease lapsed in a stall may still be receiving them on a pull request it sent before.
   * JetStream redelivers them within its ack wait, ahead of anything newer; nothing starts here until they all
   * came back (the usual case after a crash: at once) or ackWaitMs + fetchExpiresMs passed (the earlier owner
   * acknowledged some after all).
   */
  awaitEarlier(lane: Lane, count: number, upTo: number): void {
    const { settings } = this.#worker.nats;
    const timer = setTimeout(() => this.#endEarlier(lane), settings.ackWaitMs + settings.fetchExpiresMs);
    lane.earlier = { count, upTo, seen: new Set(), timer };
  }

  #endEarlier(lane: Lane): void {
    clearTimeout(lane.earlier?.timer);
    lane.earlier = undefined;
    this.#runner.pumpAll(lane);
  }

  /**
   * Deliveries numbered between the last one received and this one never reached this lane (lost on a
   * reconnection, or taken by a pull that is not ours). JetStream holds them as delivered and redelivers them
   * once their ack wait runs out; until then nothing new starts in this bucket, or a key's later messages
   * would run before them. What arrives meanwhile waits in its key's line, and the lost ones take their place
   * in stream order when they come back.
   */
  #holdBucket(lane: Lane, missing: number): void {
    const { nats, spec } = this.#worker;
    const { settings } = nats;
    // They were delivered before now, so JetStream redelivers them within ackWaitMs; a pull's length on top.
    const holdMs = settings.ackWaitMs + settings.fetchExpiresMs;
    nats.warn(
      `Subscription ${spec.name}: ${missing} deliveries of bucket ${lane.bucket} never arrived (from consumer sequence ${lane.nextDelivery}); holding the bucket ${holdMs} ms until JetStream redelivers them`,
    );
    clearTimeout(lane.gapTimer);
    lane.gapTimer = setTimeout(() => {
      lane.gapTimer = undefined;
      this.#runner.pumpAll(lane);
    }, holdMs);
  }
}

/** Waits `ms`, or until the lane's loop is woken (room under max_ack_pending, the lane released). */
function pause(lane: Lane, ms: number): Promise<void> {
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
