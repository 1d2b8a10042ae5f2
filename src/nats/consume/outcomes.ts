/**
 * How a NATS consumer ends a message: acknowledged (batched per turn of the event loop), terminated after
 * its dead letter is written, and, for a message with a durable hold, only once the hold is deleted.
 */
import type { Envelope } from '../../core/envelope.ts';
import { header, headersToRecord } from '../codec.ts';
import { deadLetterEncodings, type DeadLetterRecord } from '../dead-letters.ts';
import { isUnavailable } from '../errors.ts';
import type { Holds } from './holds.ts';
import type { Delivered } from './pull.ts';
import { quietly, type KeyLine, type Lane, type Pulled, type WorkerContext } from './state.ts';

type Ending = 'ack' | 'term';

export class Outcomes {
  readonly #worker: WorkerContext;
  readonly #holds: Holds;
  /** Acknowledgements waiting for the end of this turn of the event loop (see sendAcks). */
  readonly #acks: Delivered[] = [];
  #acksDue: NodeJS.Immediate | undefined;

  constructor(worker: WorkerContext, holds: Holds) {
    this.#worker = worker;
    this.#holds = holds;
  }

  /**
   * Acknowledges or terminates a message that has a durable hold: the hold is deleted first (confirmed), so
   * that no hold outlives its message. If NATS cannot be reached and the bucket is given up meanwhile, the
   * message is handed back with its hold, and handled again by the next owner (at least once).
   */
  async finish(lane: Lane, line: KeyLine, pulled: Pulled, how: Ending): Promise<void> {
    const { nats, spec } = this.#worker;
    const hold = pulled.hold;
    while (hold !== undefined) {
      try {
        await this.#holds.delete(hold);
        if (lane.holds.get(pulled.key) === hold) lane.holds.delete(pulled.key);
        break;
      } catch (error) {
        nats.warn(`Subscription ${spec.name}: could not delete the hold of message ${hold.id}; retrying in ${nats.settings.errorBackoffMs} ms`, error);
        if (!lane.active) return;
        await new Promise((resolve) => setTimeout(resolve, nats.settings.errorBackoffMs));
        if (!lane.active) return;
      }
    }
    this.done(lane, line, pulled, how);
  }

  /** Acknowledges (at the end of this turn) or terminates a message without a hold, and takes it off its line. */
  done(lane: Lane, line: KeyLine, pulled: Pulled, how: Ending): void {
    if (how === 'ack') {
      this.#acks.push(pulled.msg);
      this.#acksDue ??= setImmediate(() => this.sendAcks());
    } else {
      quietly(() => pulled.msg.term());
    }
    const at = line.queue.indexOf(pulled);
    if (at >= 0) line.queue.splice(at, 1);
    lane.pulled.delete(pulled.seq);
    // JetStream redelivers a message whose acknowledgement reaches it after the ack wait (a stalled process: the
    // keep-alive was late too); the lane ends such a copy the same way instead of handling it again after its
    // key's later messages. When the copy was sent, at most max_ack_pending of the consumer's messages were
    // unacknowledged on the server, so no more than that were ended here between this one and its copy.
    lane.ended.delete(pulled.seq);
    lane.ended.set(pulled.seq, how);
    if (lane.ended.size > 2 * this.#worker.maxPending) lane.ended.delete(lane.ended.keys().next().value!);
    // The pull loop may be waiting for room under max_ack_pending.
    if (lane.pulled.size === this.#worker.maxPending - 1) lane.wakeLoop?.();
  }

  /**
   * Sends the acknowledgements of the handlers finished in this turn of the event loop. nats.js writes what
   * is queued at the next microtask, so acks sent as each handler finished went out one socket write each;
   * sent together they share one. On a closed connection they throw: the messages come again (at least once).
   */
  sendAcks(): void {
    clearImmediate(this.#acksDue);
    this.#acksDue = undefined;
    for (const msg of this.#acks.splice(0)) quietly(() => msg.ack());
  }

  /**
   * Writes the dead letter to the dead-letter stream, confirmed, before the message is terminated: the first
   * of deadLetterEncodings that NATS takes. If NATS cannot be reached, the message stays (its key held) and
   * is tried again after errorBackoffMs.
   */
  async deadLetter(lane: Lane, pulled: Pulled, reason: string): Promise<boolean> {
    const { nats, spec, token } = this.#worker;
    const { js, nc, settings, dlqPrefix } = nats;
    const envelope = pulled.envelope ?? undecodableEnvelope(pulled, settings.stream);
    const record: DeadLetterRecord = {
      subscription: spec.name,
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
    const subject = `${dlqPrefix}.${token}.${pulled.topic}`;
    // Room for the headers NATS adds (Nats-Msg-Id) under the server's limit on a whole message.
    const maxBytes = (nc.info?.max_payload ?? 1_048_576) - 4_096;
    for (;;) {
      let refused: unknown;
      for (const json of deadLetterEncodings(record, pulled.msg.data, maxBytes)) {
        try {
          // One dead letter per (subscription, stream sequence): written twice after a crash, stored once.
          await js.publish(subject, Buffer.from(json), {
            msgID: `${token}:${settings.stream}:${pulled.seq}`,
            timeout: settings.publishTimeoutMs,
          });
          return true;
        } catch (error) {
          refused = error;
          if (isUnavailable(error)) break; // the same again later; a refusal tries the next, smaller one
        }
      }
      nats.warn(
        `Subscription ${spec.name}: could not write the dead letter of message ${envelope.id} (${pulled.topic}); retrying in ${settings.errorBackoffMs} ms`,
        refused,
      );
      if (!lane.active) return false;
      await new Promise((resolve) => setTimeout(resolve, settings.errorBackoffMs));
      if (!lane.active) return false;
    }
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
