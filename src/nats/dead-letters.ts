/**
 * Dead letters on NATS: one message per dead letter in the dead-letter stream (`<stream>_DLQ`, subjects
 * `<prefix>_dlq.<subscription>.<topic>`), its payload a DeadLetterRecord. The dead letter's id is its
 * sequence in that stream. Redrive publishes the original message again, marked for its subscription only,
 * then deletes the dead letter; drop deletes it.
 */
import { userInfo, hostname } from 'node:os';
import type {
  DeadLetter,
  DeadLetterActionRequest,
  DeadLetterActionResult,
  DeadLetterSelection,
  DeadLetterStore,
  DeadLetterSummary,
} from '../core/dead-letters.ts';
import { requireSelection } from '../core/dead-letters.ts';
import type { Envelope } from '../core/envelope.ts';
import { TidingsError, type AttemptRecord } from '../core/errors.ts';
import { sleep } from '../core/sleep.ts';
import type { StoredMsg } from '@nats-io/jetstream';
import type { MsgHdrs } from '@nats-io/transport-node';
import { headersToRecord, recordToHeaders, REDRIVE_FOR, toHeaders } from './codec.ts';
import type { NatsContext } from './context.ts';
import { isUnavailable } from './errors.ts';

/** The payload of a dead-letter message. */
export interface DeadLetterRecord {
  readonly subscription: string;
  readonly messageId: string;
  readonly topic: string;
  readonly key: string;
  readonly reason: string;
  readonly attempts: AttemptRecord[];
  readonly deadAt: string;
  readonly envelope: Envelope;
  /** Where the message was, and what it was on the wire, so a redrive republishes it as it came. */
  readonly source: {
    readonly stream: string;
    readonly sequence: number;
    readonly subject: string;
    readonly headers: Record<string, string[]>;
    /**
     * Base64 of the payload as it came, kept when envelope.data cannot stand for it (it could not be decoded,
     * or written back as JSON). Absent with no envelope.data either: the payload was too large to keep here,
     * and a redrive reads it from `stream` at `sequence` (see deadLetterEncodings).
     */
    readonly payload?: string;
  };
}

/**
 * The dead letter as JSON text, from the whole record down to a bare reference, for the writer to try in
 * this order: the first that can be written and fits in `maxBytes` (the server's max_payload, less room for
 * headers) is the one to keep. A message must be set aside once even when its record cannot be written
 * whole (test/input.nats.test.ts, "nested 10,000 deep"): writing it was retried every second, for ever.
 * 1. the whole record;
 * 2. the data as the text that came (a string, so no nesting) and its raw bytes: data JSON.stringify cannot
 *    write back (nested too deep for the stack);
 * 3. the raw bytes only, without the attempts' stacks: a record over the size limit;
 * 4. a reference to the message in the source stream, which keeps it (limits retention): still too large.
 * Each step after the first says in the reason what it left out.
 */
export function* deadLetterEncodings(record: DeadLetterRecord, raw: Uint8Array, maxBytes: number): Generator<string> {
  const payload = () => Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('base64');
  const bare = record.attempts.map(({ attempt, at, error }) => ({ attempt, at, error: { name: error.name, message: error.message.slice(0, 1_000) } }));
  const note = (what: string) => `${record.reason} [dead letter kept ${what}]`;
  const { data: _data, ...envelope } = record.envelope;
  const candidates: Array<() => DeadLetterRecord> = [
    () => record,
    () => ({
      ...record,
      reason: note('with its data as the text that came: it cannot be written back as JSON'),
      envelope: { ...record.envelope, data: Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('utf8') },
      source: { ...record.source, payload: payload() },
    }),
    () => ({
      ...record,
      reason: note(`without its data (its ${raw.byteLength} bytes in source.payload) and stacks: the whole record is over ${maxBytes} bytes`),
      attempts: bare,
      envelope: envelope as DeadLetterRecord['envelope'],
      source: { ...record.source, payload: payload() },
    }),
    () => ({
      ...record,
      reason: note(
        `without its payload, headers and stacks: over ${maxBytes} bytes; the message is in stream ${record.source.stream} at sequence ${record.source.sequence}`,
      ),
      attempts: bare,
      envelope: envelope as DeadLetterRecord['envelope'],
      source: { stream: record.source.stream, sequence: record.source.sequence, subject: record.source.subject, headers: {} },
    }),
  ];
  for (const candidate of candidates) {
    let json: string;
    try {
      json = JSON.stringify(candidate());
    } catch {
      continue; // nested deeper than the stack, or a value JSON cannot hold: the next one leaves the data out
    }
    if (Buffer.byteLength(json) <= maxBytes) yield json;
  }
}

interface Stored {
  readonly seq: number;
  readonly record: DeadLetterRecord;
}

export class NatsDeadLetters implements DeadLetterStore {
  readonly #context: () => Promise<NatsContext>;

  constructor(context: () => Promise<NatsContext>) {
    this.#context = context;
  }

  async list(selection: DeadLetterSelection & { readonly limit?: number | undefined }): Promise<{ total: number; deadLetters: DeadLetterSummary[] }> {
    const matched = await this.#select(selection, false);
    const limit = selection.limit ?? matched.length;
    return { total: matched.length, deadLetters: matched.slice(0, limit).map(summary) };
  }

  async show(id: string): Promise<DeadLetter[]> {
    const matched = await this.#select({ ids: [id] }, false);
    return matched.map(({ seq, record }) => ({ ...summary({ seq, record }), envelope: record.envelope, attempts: record.attempts }));
  }

  async count(selection: DeadLetterSelection): Promise<number> {
    return (await this.#select(selection, false)).length;
  }

  redrive(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return this.#act(request, 'redrive');
  }

  drop(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return this.#act(request, 'drop');
  }

  async #act(request: DeadLetterActionRequest, action: 'redrive' | 'drop'): Promise<DeadLetterActionResult> {
    const rate = request.ratePerSecond;
    if (rate !== undefined && !(typeof rate === 'number' && rate > 0)) {
      throw new TidingsError('INVALID_OPTIONS', `ratePerSecond must be a positive number of messages per second, got ${rate}`);
    }
    const ctx = await this.#context();
    const matched = await this.#select(request, true);
    const result = { matched: matched.length, count: 0, bySubscription: {} as Record<string, number>, messageIds: [] as string[], stopped: false };
    const started = Date.now();
    request.onProgress?.({ done: 0, total: matched.length });
    for (const { seq, record } of matched) {
      if (request.signal?.aborted === true) {
        result.stopped = true;
        break;
      }
      if (action === 'redrive') {
        try {
          const { headers, payload } = await original(ctx, record);
          headers.set(REDRIVE_FOR, record.subscription);
          headers.set('tidings-redriven-by', actorOf(request));
          // A new Nats-Msg-Id: the original id is likely still inside the duplicate window. The message id
          // itself (ce-id) is unchanged, so an inbox still recognises it.
          await ctx.js.publish(record.source.subject, payload, {
            headers,
            msgID: `${record.messageId}:redrive:${ctx.dlqStream}:${seq}`,
            timeout: ctx.settings.publishTimeoutMs,
          });
        } catch (error) {
          throw new TidingsError(
            isUnavailable(error) ? 'BACKBONE_UNAVAILABLE' : 'PUBLISH_FAILED',
            `Could not redrive dead letter ${seq} (message ${record.messageId}, ${record.topic}): ${(error as Error).message}; ${result.count} were redriven before it, run the command again for the rest`,
            {
              cause: error,
              ref: { id: record.messageId, topic: record.topic, key: record.key },
              retryable: isUnavailable(error),
            },
          );
        }
      }
      // Gone already: another operator got there first.
      const deleted = await ctx.jsm.streams.deleteMessage(ctx.dlqStream, seq, false).catch(() => false);
      if (deleted || action === 'redrive') {
        result.count++;
        result.bySubscription[record.subscription] = (result.bySubscription[record.subscription] ?? 0) + 1;
        result.messageIds.push(record.messageId);
      }
      request.onProgress?.({ done: result.count, total: matched.length });
      if (rate !== undefined) await sleep(started + (result.count / rate) * 1000 - Date.now(), request.signal);
    }
    return result;
  }

  /** Reads the dead-letter stream through an ordered consumer and keeps what matches, oldest first. */
  async #select(selection: DeadLetterSelection, requireFilter: boolean): Promise<Stored[]> {
    if (requireFilter) requireSelection(selection);
    const ctx = await this.#context();
    const ids = selection.ids === undefined || selection.ids.length === 0 ? undefined : new Set(selection.ids);
    const text = selection.errorText?.toLowerCase();
    const all = await readAll(ctx);
    return all.filter(({ seq, record }) => {
      if (ids !== undefined && !ids.has(String(seq)) && !ids.has(record.messageId)) return false;
      if (selection.subscription !== undefined && record.subscription !== selection.subscription) return false;
      if (selection.topic !== undefined && record.topic !== selection.topic) return false;
      if (text !== undefined && !record.reason.toLowerCase().includes(text) && !record.attempts.some((a) => a.error.message.toLowerCase().includes(text)))
        return false;
      return true;
    });
  }
}

async function readAll(ctx: NatsContext): Promise<Stored[]> {
  const info = await ctx.jsm.streams.info(ctx.dlqStream);
  if (info.state.messages === 0) return [];
  const last = info.state.last_seq;
  const out: Stored[] = [];
  const reader = await ctx.js.consumers.get(ctx.dlqStream);
  const messages = await reader.consume({ max_messages: 256 });
  // A message deleted while we read can leave us waiting for one that never comes: stop after a quiet spell.
  let quiet = setTimeout(() => messages.stop(), 3_000);
  try {
    for await (const msg of messages) {
      clearTimeout(quiet);
      try {
        out.push({ seq: msg.seq, record: JSON.parse(Buffer.from(msg.data).toString('utf8')) as DeadLetterRecord });
      } catch {
        // Not written by Tidings: skip it rather than fail the whole listing.
      }
      if (msg.info.pending === 0 || msg.seq >= last) break;
      quiet = setTimeout(() => messages.stop(), 3_000);
    }
  } finally {
    clearTimeout(quiet);
    messages.stop();
  }
  return out;
}

/** The message as it came, to publish again: from the dead letter, or from the source stream if it was too large to keep. */
async function original(ctx: NatsContext, record: DeadLetterRecord): Promise<{ headers: MsgHdrs; payload: Uint8Array }> {
  const kept = Object.keys(record.source.headers).length > 0 ? recordToHeaders(record.source.headers) : undefined;
  if (record.source.payload !== undefined) return { headers: kept ?? toHeaders(record.envelope), payload: Buffer.from(record.source.payload, 'base64') };
  if ('data' in record.envelope) return { headers: kept ?? toHeaders(record.envelope), payload: Buffer.from(JSON.stringify(record.envelope.data)) };
  let stored: StoredMsg | null;
  let missing: unknown;
  try {
    stored = await ctx.jsm.streams.getMessage(record.source.stream, { seq: record.source.sequence });
  } catch (error) {
    if (isUnavailable(error)) throw error;
    [stored, missing] = [null, error];
  }
  if (stored === null) {
    throw new TidingsError(
      'PUBLISH_FAILED',
      `Dead letter of message ${record.messageId} (${record.topic}) keeps no payload, and stream ${record.source.stream} no longer has it at sequence ${record.source.sequence}: it cannot be redriven; drop it`,
      { cause: missing, ref: { id: record.messageId, topic: record.topic, key: record.key } },
    );
  }
  return { headers: recordToHeaders(headersToRecord(stored.header)), payload: stored.data };
}

function summary({ seq, record }: Stored): DeadLetterSummary {
  return {
    id: String(seq),
    subscription: record.subscription,
    messageId: record.messageId,
    topic: record.topic,
    key: record.key,
    position: record.source.sequence,
    reason: record.reason,
    attempts: record.attempts.length,
    deadAt: record.deadAt,
  };
}

function actorOf(request: DeadLetterActionRequest): string {
  if (request.actor !== undefined) return request.actor;
  try {
    return `${userInfo().username}@${hostname()}`;
  } catch {
    return `unknown@${hostname()}`;
  }
}
