/**
 * Durable holds: a message waiting for a delayed retry, written to JetStream (the `<stream>_holds` KV bucket)
 * before its key starts waiting, so the wait survives a crash or a hand-over of its bucket. The next owner of
 * the bucket reads the holds before it handles anything there, runs the held message at its time with its
 * attempt history, and runs none of that key's later messages before it (test/faults.nats.test.ts, "kill -9
 * while a key waits for its retry"). Kept in JetStream rather than in the outbox database so that it works the
 * same with and without an outbox, and one bucket lease covers the messages and their holds.
 *
 * Keys: `<subscription>.<bucket>.<stream sequence>`. A hold is deleted (confirmed) before its message is
 * acknowledged or terminated, so a crash in between leaves an unacknowledged message and no hold, never a hold
 * whose message is gone for good; a hold whose message left the stream (limits, a purge) is dropped on load.
 * A hold is deleted as a message of the bucket's stream, by its revision, not with a KV delete: a delete
 * marker would stay for every message that ever waited.
 */
import type { JetStreamManager } from '@nats-io/jetstream';
import type { KV } from '@nats-io/kv';
import type { AttemptRecord } from '../../core/errors.ts';
import { apiErrorCode } from '../errors.ts';
import { readEntries } from '../kv.ts';

export interface Hold {
  /** Its revision in the KV bucket (the hold's own sequence there); 0 before it is written. */
  readonly revision: number;
  /** The message's stream sequence. */
  readonly seq: number;
  /** Its partition key: the key whose later messages wait for it. */
  readonly key: string;
  readonly id: string;
  /** When it is to be tried again (epoch ms, the writer's clock). */
  readonly dueAt: number;
  /** Its failed attempts so far, oldest first. */
  readonly attempts: readonly AttemptRecord[];
}

/** Stacks are cut to this many characters in a hold: a KV value is one message, under the server's max_payload. */
const STACK_CHARS = 4_000;

export class Holds {
  readonly #kv: KV;
  readonly #jsm: JetStreamManager;
  readonly #bucket: string;
  readonly #token: string;

  constructor(kv: KV, jsm: JetStreamManager, bucket: string, subscriptionToken: string) {
    this.#kv = kv;
    this.#jsm = jsm;
    this.#bucket = bucket;
    this.#token = subscriptionToken;
  }

  #key(bucket: number, seq: number): string {
    return `${this.#token}.${bucket}.${seq}`;
  }

  /** Every hold of one bucket of the subscription. */
  async load(bucket: number): Promise<Hold[]> {
    const entries = await readEntries(this.#jsm, this.#kv, this.#bucket, `${this.#token}.${bucket}.*`);
    return entries.map((entry) => ({ ...entry.json<Hold>(), revision: entry.revision }));
  }

  /** Writes (or rewrites) the hold; resolves with it as stored, its revision set. */
  async put(bucket: number, hold: Hold): Promise<Hold> {
    const attempts = hold.attempts.map((record) => ({
      ...record,
      error: { ...record.error, ...(record.error.stack === undefined ? {} : { stack: record.error.stack.slice(0, STACK_CHARS) }) },
    }));
    const { revision: _, ...stored } = { ...hold, attempts };
    const revision = await this.#kv.put(this.#key(bucket, hold.seq), JSON.stringify(stored));
    return { ...hold, revision };
  }

  /** Deletes the hold; one already gone (deleted by an owner before) is no error. */
  async delete(hold: Hold): Promise<void> {
    await this.#jsm.streams.deleteMessage(`KV_${this.#bucket}`, hold.revision, false).catch((error: unknown) => {
      // 10057: the delete failed; "no message found" is the one failure that means done.
      if (apiErrorCode(error) !== 10057 || !/no message found/i.test((error as Error).message)) throw error;
    });
  }
}
