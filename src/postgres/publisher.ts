import type { Outgoing } from '../core/backbone.ts';
import { Batcher } from '../core/batching.ts';
import { logParams, messagesJson } from './codec.ts';
import { runStatement, type Queryable, type Statement } from './connection/driver.ts';

interface GroupCommitOptions {
  /** Most messages written by one statement. */
  readonly maxBatch: number;
  /** Writes in flight at once; while they run, new publishes gather into the next one. */
  readonly maxInFlight: number;
}

/**
 * Group commit for publishes made outside any transaction (see Batcher): publishes issued while a write is
 * in flight are gathered and written together by the next single statement, which commits on its own. Each
 * caller's promise resolves once its messages are durable.
 */
export class GroupCommit {
  readonly #batcher: Batcher<readonly Outgoing[], void>;

  constructor(
    options: GroupCommitOptions,
    write: (messages: readonly Outgoing[], topics: ReadonlySet<string>) => Promise<void>,
    committed: (topics: ReadonlySet<string>) => void,
  ) {
    this.#batcher = new Batcher(
      async (calls) => {
        const messages = calls.length === 1 ? calls[0]! : calls.flat();
        const topics = new Set(messages.map((message) => message.envelope.topic));
        await write(messages, topics);
        committed(topics);
        return NOTHING;
      },
      { inFlight: options.maxInFlight, maxBatch: options.maxBatch, weight: (messages) => messages.length },
    );
  }

  publish(messages: readonly Outgoing[]): Promise<void> {
    return this.#batcher.submit(messages);
  }
}

/** What every caller of a write gets back: nothing (a sparse array reads as undefined everywhere). */
const NOTHING: void[] = [];

/**
 * The one statement that writes `messages`, prepared where the connection allows (its parse and plan cost
 * about as much as running it). With `wake`, the same statement sends the NOTIFY that wakes other
 * processes' consumers: for a statement that commits on its own, that spares the NOTIFY's own round trip
 * (a NOTIFY only serialises commits that carry one, and group commit keeps those few).
 */
export function insertStatement(
  statements: { schema: string; insertMessage: string; insertMessages: string },
  messages: readonly Outgoing[],
  wake?: { channel: string; payload: string },
): Statement {
  const insert = insertOnly(statements, messages);
  if (wake === undefined) return insert;
  const n = insert.params.length;
  return {
    name: `${insert.name}.wake`,
    text: `with inserted as (${insert.text}) select pg_notify($${n + 1}, $${n + 2})`,
    params: [...insert.params, wake.channel, wake.payload],
  };
}

function insertOnly(
  statements: { schema: string; insertMessage: string; insertMessages: string },
  messages: readonly Outgoing[],
): Statement & { name: string } {
  if (messages.length === 1) {
    return { name: `tidings.${statements.schema}.insert1`, text: statements.insertMessage, params: logParams(messages[0]!) };
  }
  return { name: `tidings.${statements.schema}.insertn`, text: statements.insertMessages, params: [messagesJson(messages)] };
}

/** Writes messages with one statement (and wakes other processes' consumers with it, given `wake`). */
export async function insertMessages(
  db: Queryable,
  statements: { schema: string; insertMessage: string; insertMessages: string },
  messages: readonly Outgoing[],
  wake?: { channel: string; payload: string },
): Promise<void> {
  await runStatement(db, insertStatement(statements, messages, wake));
}
