/**
 * How an envelope is stored in the log, both ways: a log row read back into its envelope (the consumer,
 * the tail, `messages()`), and envelopes written as the log's columns (one message as parameters, many as
 * JSON text, a stream as COPY text). Also what PostgreSQL refuses to store, checked before writing. The
 * one place that knows the log's columns from the JavaScript side; `statements.ts` holds the SQL.
 */
import type { Outgoing } from '../core/backbone.ts';
import type { Envelope } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';

/**
 * A row of the log as readers get it (see `statements.readLanes` and `dueHeld`): the envelope's attributes
 * in columns, `time` as ISO text, `seen` when the reader's inbox has the id.
 */
export interface LogRow {
  position: number | string;
  topic: string;
  id: string;
  type: string;
  source: string;
  time: Date | string;
  subject: string | null;
  key: string;
  key_hash: number;
  tenant: string | null;
  correlation_id: string;
  causation_id: string | null;
  traceparent: string | null;
  tracestate: string | null;
  data: unknown;
  seen?: boolean;
}

/** A log row back into the envelope it was written from. */
export function toEnvelope(row: LogRow): Envelope {
  return {
    specversion: '1.0',
    id: row.id,
    source: row.source,
    type: row.type,
    // Readers select `time` as ISO text already (see statements' logColumns): no parsing on the hot path.
    time: row.time instanceof Date ? row.time.toISOString() : String(row.time),
    subject: row.subject ?? undefined,
    datacontenttype: 'application/json',
    topic: row.topic,
    partitionkey: row.key,
    tenant: row.tenant ?? undefined,
    correlationid: row.correlation_id,
    causationid: row.causation_id ?? undefined,
    traceparent: row.traceparent ?? undefined,
    tracestate: row.tracestate ?? undefined,
    data: row.data,
  };
}

/** A timestamp column as ISO text, whether the driver parsed it (pg) or not (text, PGlite's casts). */
export function iso(value: Date | string): string {
  return value instanceof Date ? value.toISOString() : new Date(value).toISOString();
}

/** One message as the parameters of `statements.insertMessage`, in its column order. */
export function logParams({ envelope: e, json, keyHash }: Outgoing): unknown[] {
  return [
    e.topic,
    e.id,
    e.type,
    e.source,
    e.time,
    e.subject ?? null,
    e.partitionkey,
    keyHash,
    e.tenant ?? null,
    e.correlationid,
    e.causationid ?? null,
    e.traceparent ?? null,
    e.tracestate ?? null,
    json,
  ];
}

/** The JSON text `insertMessages` and `insertScheduled` take: one object per message, the data spliced in as already serialised. */
export function messagesJson(messages: readonly Outgoing[]): string {
  const parts: string[] = [];
  for (const { envelope: e, json, keyHash, dueAt } of messages) {
    const head = JSON.stringify({
      topic: e.topic,
      id: e.id,
      type: e.type,
      source: e.source,
      time: e.time,
      subject: e.subject,
      key: e.partitionkey,
      key_hash: keyHash,
      tenant: e.tenant,
      correlation_id: e.correlationid,
      causation_id: e.causationid,
      traceparent: e.traceparent,
      tracestate: e.tracestate,
      due_at: dueAt === undefined ? undefined : new Date(dueAt).toISOString(),
    });
    parts.push(`${head.slice(0, -1)},"data":${json}}`);
  }
  return `[${parts.join(',')}]`;
}

/** What COPY's text format escapes: its own escape character and the field and row delimiters. */
const COPY_SPECIAL = /[\\\t\n\r]/;
const COPY_ESCAPES: Record<string, string> = { '\\': '\\\\', '\t': '\\t', '\n': '\\n', '\r': '\\r' };

function copyField(value: string | null | undefined): string {
  if (value === undefined || value === null) return '\\N';
  return COPY_SPECIAL.test(value) ? value.replace(/[\\\t\n\r]/g, (char) => COPY_ESCAPES[char]!) : value;
}

/** JSON text as a COPY field: JSON.stringify escapes every control character, so only backslashes need it. */
function copyJson(json: string): string {
  return json.includes('\\') ? json.replaceAll('\\', '\\\\') : json;
}

/** `messages` as rows of `COPY ... FROM STDIN` text, in the columns of `copyMessages`. */
export function copyRows(messages: readonly Outgoing[]): string {
  let text = '';
  for (const { envelope: e, json, keyHash } of messages) {
    text += `${copyField(e.topic)}\t${copyField(e.id)}\t${copyField(e.type)}\t${copyField(e.source)}\t${copyField(e.time)}\t${copyField(e.subject)}\t`;
    text += `${copyField(e.partitionkey)}\t${keyHash}\t${copyField(e.tenant)}\t${copyField(e.correlationid)}\t${copyField(e.causationid)}\t`;
    text += `${copyField(e.traceparent)}\t${copyField(e.tracestate)}\t${copyJson(json)}\n`;
  }
  return text;
}

/** `\u0000` in JSON text, not preceded by an escaped backslash (`\\u0000` is the harmless text "\u0000"). */
const NUL_ESCAPE = /(?:^|[^\\])(?:\\\\)*\\u0000/;
/** A lone UTF-16 surrogate, as JSON.stringify escapes it (jsonb refuses it). */
const LONE_SURROGATE_ESCAPE = /\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2}/i;
/** A lone UTF-16 surrogate in a string (text columns refuse it). */
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** The attributes stored in text columns. */
const ATTRIBUTES = ['id', 'source', 'type', 'subject', 'topic', 'partitionkey', 'tenant', 'correlationid', 'causationid', 'traceparent', 'tracestate'] as const;

/**
 * Throws INVALID_PAYLOAD, naming the message, for the first of `messages` PostgreSQL would refuse. Checked
 * before writing, so one bad message cannot fail the group commit other callers' messages share.
 */
export function refuseUnstorable(messages: readonly Outgoing[]): void {
  for (const { envelope, json } of messages) {
    const problem = unstorable(envelope, json);
    if (problem !== undefined) {
      throw new TidingsError(
        'INVALID_PAYLOAD',
        `Message ${envelope.id} on ${envelope.topic} cannot be stored in PostgreSQL: ${problem}; remove it or encode the value`,
        {
          ref: { id: envelope.id, topic: envelope.topic, key: envelope.partitionkey },
        },
      );
    }
  }
}

/** Why PostgreSQL would refuse this message, if it would: text cannot hold NUL characters or lone surrogates. */
function unstorable(envelope: Envelope, json: string): string | undefined {
  for (const name of ATTRIBUTES) {
    const value = envelope[name];
    if (typeof value !== 'string') continue;
    if (value.includes('\0')) return `${name} contains a NUL character`;
    if (LONE_SURROGATE.test(value)) return `${name} contains a lone UTF-16 surrogate`;
  }
  if (!json.includes('\\')) return undefined; // both are escapes: the usual payload has none
  if (NUL_ESCAPE.test(json)) return 'data contains a NUL character (\\u0000)';
  if (LONE_SURROGATE_ESCAPE.test(json)) return 'data contains a lone UTF-16 surrogate';
  return undefined;
}
