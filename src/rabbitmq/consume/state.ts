/** What the parts of a partition reader share: the subscription's host, the channel, the lanes of keys. */
import type { ConfirmChannel, ConsumeMessage, Options } from 'amqplib';
import type { DeliveryHandler, SubscriptionSpec } from '../../core/backbone.ts';
import { TidingsError } from '../../core/errors.ts';
import type { ChannelAcks } from './acks.ts';
import type { Decoded } from '../codec.ts';
import type { Link } from '../connection.ts';
import type { RecentIds, Slots } from './slots.ts';
import type { Names, TopologySettings } from '../topology.ts';
import type { Workers } from './workers.ts';
import type { BackboneObserver } from '../../telemetry/observer.ts';

export interface ReaderSettings extends TopologySettings {
  /** Unacknowledged messages per partition queue (per-consumer basic.qos). */
  readonly prefetch: number;
  readonly retryMinMs: number;
  readonly retryReturnGraceMs: number;
  readonly reconnectMinMs: number;
  readonly reconnectMaxMs: number;
  readonly connectTimeoutMs: number;
  /** A reader whose marker has not come back within this time starts over (workers.ts' timeout). */
  readonly workerTimeoutMs: number;
  readonly warn: (message: string, error?: unknown) => void;
  /** The bus's telemetry, once it handed it over (Backbone.observe): the readers' receive spans. */
  readonly observer?: () => BackboneObserver | undefined;
}

/** What to do with a message of a topic this worker has no handler for (RabbitConsumer#unhandled). */
export type Unhandled =
  | { readonly action: 'hand-over'; readonly pauseMs: number }
  | { readonly action: 'skip' }
  | { readonly action: 'dead-letter'; readonly reason: string };

/** What the readers of one subscription share (RabbitConsumer). */
export interface ReaderHost {
  readonly spec: SubscriptionSpec;
  readonly handle: DeliveryHandler<undefined>;
  readonly link: Link;
  readonly names: Names;
  readonly settings: ReaderSettings;
  readonly slots: Slots;
  readonly recent: RecentIds;
  readonly workers: Workers;
  unhandled(partition: number, topic: string, id: string, fromItsExchange: boolean): Unhandled;
}

/** A message in a key's lane. */
export interface Entry {
  readonly key: string;
  readonly id: string;
  /** Its place in the lane (held records carry it). */
  readonly seq: number;
  /** local: delivered, waiting; running; moving: being parked in a delay queue; away: in a delay queue, place kept. */
  state: 'local' | 'running' | 'moving' | 'away';
  message: ConsumeMessage | undefined;
  decoded: Decoded | undefined;
  /** The channel generation the message was delivered on: acknowledgements only count on that channel. */
  generation: number;
  /** For an away entry: when its copy is due back from the delay queue, and when to stop waiting for it. */
  dueAt: number;
  giveUpAt: number;
  /** The delivery of its hold record, acknowledged when the entry is finished. */
  record: Delivered | undefined;
  /** Returns of its message that a reader before this one made without starting it: not attempts. */
  unstarted: number;
}

/** A delivery, with the channel generation it came on. */
export interface Delivered {
  readonly message: ConsumeMessage;
  readonly generation: number;
}

/**
 * idle: no channel. opening. waiting: consuming, nothing delivered yet (the queue is empty or another reader
 * is active). restoring: the first message came; picking up the partition's holds (holds.ts). reading.
 * releasing: no new handler starts; the channel closes once the running ones are finished.
 */
type Phase = 'idle' | 'opening' | 'waiting' | 'restoring' | 'reading' | 'releasing';

/** One partition reader's state, read and changed by its parts (reader.ts wires them). */
export interface ReaderState {
  readonly index: number;
  readonly host: ReaderHost;
  /** The partition queue and its holds queue. */
  readonly queue: string;
  readonly holdsQueue: string;
  phase: Phase;
  channel: ConfirmChannel | undefined;
  acks: ChannelAcks | undefined;
  /** Counts the channels: a delivery, an acknowledgement, a callback of an older channel is ignored. */
  generation: number;
  /** Each key's messages in arrival order: its head runs, the rest wait. */
  readonly lanes: Map<string, Entry[]>;
  /** Keys whose lane head can run, in the order they became ready. */
  ready: string[];
  /** Work in flight (handlers, parking, dead letters): closing waits for it. */
  readonly tasks: Set<Promise<void>>;
}

export function readerState(host: ReaderHost, index: number): ReaderState {
  return {
    index,
    host,
    queue: host.names.partition(host.spec.name, index),
    holdsQueue: host.names.holds(host.spec.name, index),
    phase: 'idle',
    channel: undefined,
    acks: undefined,
    generation: 0,
    lanes: new Map(),
    ready: [],
    tasks: new Set(),
  };
}

export function track(state: ReaderState, task: Promise<void>): void {
  state.tasks.add(task);
  task.finally(() => state.tasks.delete(task)).catch(() => undefined);
}

/** Registers a delivery with its channel's acknowledgements, then hands it on; null: the server cancelled us. */
export function received(channel: ConfirmChannel, acks: ChannelAcks, message: ConsumeMessage | null, then: (message: ConsumeMessage) => void): void {
  if (message === null) {
    // The queue was deleted or the server cancelled us: start over on a new channel.
    channel.close().catch(() => undefined);
    return;
  }
  acks.delivered(message);
  then(message);
}

/** Acknowledges the entry's message on the channel that delivered it; throws if that channel is gone. */
export function ackEntry(state: ReaderState, entry: Entry, delivered: Delivered = { message: entry.message!, generation: entry.generation }): void {
  if (delivered.generation !== state.generation || state.acks === undefined) {
    throw new TidingsError('BACKBONE_UNAVAILABLE', `The channel that delivered message ${entry.id} closed before its acknowledgement`, { retryable: true });
  }
  state.acks.ack(delivered.message);
}

/** Acknowledges a hold record, if the channel that delivered it is still the reader's. */
export function ackRecord(state: ReaderState, record: Delivered): void {
  if (record.generation === state.generation) state.acks?.ack(record.message);
}

/** The channel that delivered the entry, if it is still open. */
export function channelOf(state: ReaderState, entry: Entry): ConfirmChannel {
  const channel = state.channel;
  if (channel === undefined || entry.generation !== state.generation) {
    throw new TidingsError('BACKBONE_UNAVAILABLE', `The channel that delivered message ${entry.id} closed`, { retryable: true });
  }
  return channel;
}

/** Publishes to a queue (through the default exchange) and waits for the broker's confirm. */
export function sendConfirmed(channel: ConfirmChannel, queue: string, content: Buffer, options: Options.Publish): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      channel.publish('', queue, content, options, (error: unknown) => (error ? reject(error) : resolve()));
    } catch (error) {
      reject(error);
    }
  });
}
