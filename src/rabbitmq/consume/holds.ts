/**
 * The holds queue of a partition (`<prefix><subscription>:p<n>:holds`): the durable memory of which keys of
 * the partition wait for a delayed retry, so that whoever reads the partition next (after a crash, a
 * hand-over to another worker, a lost connection) keeps holding them.
 *
 * A hold record names a message that left the partition queue for a delay queue while keeping its place in
 * its key's lane: the retried message itself, or a later message of a held key parked so that it does not
 * fill the prefetch window. It is published (confirmed) before that message is acknowledged, stays
 * unacknowledged with the partition's reader while the message is away, and is acknowledged once the
 * message is back and finished. Each record carries its place in the lane, so a reader rebuilds every held
 * key's lane as it was.
 *
 * The holds queue is declared the first time the partition holds a key. It has a single active consumer,
 * like the partition queue, and a reader consumes both on one channel. Closing that channel (a crash closes
 * it too) returns the records to the holds queue; but the two queues hear of it separately, so the next
 * reader could start on the partition before the records are back. A marker closes that race: on its first
 * delivery from the partition queue, a reader that finds a holds queue consumes it, publishes a marker of its
 * own to it and handles nothing until the marker comes back. It can only come back once the reader is the
 * holds queue's active consumer, that is once the previous reader's records were returned, and those come
 * first. So a reader knows every hold before it handles a message. (A partition without a holds queue never
 * held a key: its reader starts at once.) (Test: faults.rabbitmq 'kill -9 while a key waits for its delayed retry...'.)
 *
 * A reader that lets go of the partition gracefully also says which messages it returns without having
 * started them (a "returned" record): the queue counts every return as a delivery (x-delivery-count), and
 * the next reader takes those returns off a message's attempt count, so that a partition changing hands does
 * not use up its messages' retries. A crash writes no such record: a message it returns may have been
 * running, and counts as an attempt. (Test: workers.rabbitmq 'a partition handed over while...'.)
 */
import type { ConsumeMessage, Options } from 'amqplib';

/** What a message of the holds queue is. */
const H_KIND = 'x-tidings-kind';

export interface HoldRecord {
  readonly key: string;
  readonly id: string;
  /** When the message is due back from its delay queue (epoch ms). */
  readonly dueAt: number;
  /** Its place in its key's lane: a reader puts a key's held messages back in this order. */
  readonly seq: number;
}

interface Marker {
  /** The worker whose reader published it (workers.ts). */
  readonly worker: string;
  /** Unique per reading of the partition. */
  readonly token: string;
}

/** Message id -> how many times it was returned to the partition queue without having been started. */
export type Unstarted = Readonly<Record<string, number>>;

type HoldsMessage =
  | { readonly kind: 'hold'; readonly record: HoldRecord }
  | { readonly kind: 'marker'; readonly marker: Marker }
  | { readonly kind: 'returned'; readonly unstarted: Unstarted }
  | { readonly kind: 'unknown' };

export function holdMessage(record: HoldRecord): { body: Buffer; options: Options.Publish } {
  return { body: Buffer.from(JSON.stringify(record)), options: { persistent: true, contentType: 'application/json', headers: { [H_KIND]: 'hold' } } };
}

export function markerMessage(marker: Marker): { body: Buffer; options: Options.Publish } {
  return { body: Buffer.from(JSON.stringify(marker)), options: { persistent: true, contentType: 'application/json', headers: { [H_KIND]: 'marker' } } };
}

export function returnedMessage(unstarted: Unstarted): { body: Buffer; options: Options.Publish } {
  return {
    body: Buffer.from(JSON.stringify({ unstarted })),
    options: { persistent: true, contentType: 'application/json', headers: { [H_KIND]: 'returned' } },
  };
}

/** Reads a message of the holds queue; anything else (a message put there by hand) is `unknown`. */
export function readHoldsMessage(message: ConsumeMessage): HoldsMessage {
  const kind = message.properties.headers?.[H_KIND] as unknown;
  let body: Record<string, unknown>;
  try {
    body = JSON.parse(message.content.toString('utf8')) as Record<string, unknown>;
  } catch {
    return { kind: 'unknown' };
  }
  if (kind === 'hold' && typeof body.key === 'string' && typeof body.id === 'string' && typeof body.dueAt === 'number' && typeof body.seq === 'number') {
    return { kind: 'hold', record: { key: body.key, id: body.id, dueAt: body.dueAt, seq: body.seq } };
  }
  if (kind === 'marker' && typeof body.worker === 'string' && typeof body.token === 'string') {
    return { kind: 'marker', marker: { worker: body.worker, token: body.token } };
  }
  if (kind === 'returned' && typeof body.unstarted === 'object' && body.unstarted !== null) {
    const unstarted: Record<string, number> = {};
    for (const [id, count] of Object.entries(body.unstarted)) if (Number.isInteger(count) && (count as number) > 0) unstarted[id] = count as number;
    return { kind: 'returned', unstarted };
  }
  return { kind: 'unknown' };
}
