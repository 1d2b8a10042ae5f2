/**
 * How a Tidings envelope travels on NATS: the CloudEvents NATS protocol binding in binary content mode.
 * Each attribute is a `ce-<name>` header, `content-type` carries `datacontenttype`, and the payload is the
 * data as JSON text, so a plain NATS client reads the event without knowing Tidings.
 */
import { headers as natsHeaders, Match, type MsgHdrs } from 'nats';
import type { Envelope } from '../core/envelope.ts';

/** The attributes sent as `ce-` headers, in the order they are written. */
const ATTRIBUTES = [
  'specversion',
  'id',
  'source',
  'type',
  'time',
  'subject',
  'topic',
  'partitionkey',
  'tenant',
  'correlationid',
  'causationid',
  'traceparent',
  'tracestate',
] as const satisfies ReadonlyArray<keyof Envelope>;

/** Set on a redriven message: only this subscription handles it; the others acknowledge it unseen. */
export const REDRIVE_FOR = 'tidings-redrive-for';

/**
 * Header values are percent-encoded by the HTTP binding's rule (space, `"`, `%` and anything outside printable
 * ASCII), since a NATS header value cannot hold a line break. Ordinary ids, types and keys pass unchanged.
 */
export function encodeValue(value: string): string {
  return /[^\x21-\x7e]|["%]/.test(value) ? value.replace(/[^\x21-\x7e]|["%]/gu, (c) => encodeURIComponent(c).replace(/"/g, '%22')) : value;
}

export function decodeValue(value: string): string {
  if (!value.includes('%')) return value;
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

export function toHeaders(envelope: Envelope): MsgHdrs {
  const h = natsHeaders();
  for (const name of ATTRIBUTES) {
    const value = envelope[name];
    if (value !== undefined && value !== null) h.set(`ce-${name}`, encodeValue(String(value)));
  }
  h.set('content-type', envelope.datacontenttype);
  return h;
}

export function header(h: MsgHdrs | undefined, name: string): string | undefined {
  if (h === undefined || !h.has(name, Match.IgnoreCase)) return undefined;
  return decodeValue(h.get(name, Match.IgnoreCase));
}

/** A message's headers by lower-case name, each its first value decoded (what `header` gives, for one name). */
export type HeaderFields = ReadonlyMap<string, string>;

/**
 * Reads every header once. A case-insensitive `MsgHdrs` look-up scans all the names, and decoding reads
 * about fifteen of them per message: on a drain that was a tenth of the consumer's time.
 */
export function headerFields(h: MsgHdrs | undefined): HeaderFields {
  const fields = new Map<string, string>();
  if (h === undefined) return fields;
  for (const [name, values] of h) {
    const lower = name.toLowerCase();
    if (!fields.has(lower)) fields.set(lower, decodeValue(values[0] ?? ''));
  }
  return fields;
}

/** What the wire carried, decoded as far as it goes; `problem` says why it is not a Tidings message. */
export type Decoded = { readonly envelope: Envelope; readonly problem?: undefined } | { readonly envelope?: undefined; readonly problem: string };

/**
 * Reads a message back into an envelope. Required: `ce-specversion` 1.0, `ce-id`, `ce-source`, `ce-type`
 * and a JSON payload. Tidings' own extensions default for foreign CloudEvents producers: the topic comes from
 * the subject, the key is the id (no order), the correlation id is the id, the time is the stream's.
 */
export function decode(fields: HeaderFields, payload: Uint8Array, topicFromSubject: string, storedAtNanos: number): Decoded {
  const header = (name: string) => fields.get(name);
  const missing = ['specversion', 'id', 'source', 'type'].filter((name) => !header(`ce-${name}`));
  if (missing.length > 0) return { problem: `no CloudEvents attribute${missing.length > 1 ? 's' : ''} ${missing.map((m) => `ce-${m}`).join(', ')} in its headers` };
  const specversion = header('ce-specversion');
  if (specversion !== '1.0') return { problem: `ce-specversion is ${JSON.stringify(specversion)}, not "1.0"` };
  const contentType = header('content-type') ?? header('ce-datacontenttype');
  if (contentType !== undefined && !/^application\/(?:[\w.+-]+\+)?json\b/i.test(contentType)) {
    return { problem: `content-type is ${JSON.stringify(contentType)}, not application/json` };
  }
  let data: unknown;
  try {
    data = JSON.parse(Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).toString('utf8'));
  } catch (error) {
    return { problem: `the payload is not JSON (${(error as Error).message})` };
  }
  const id = header('ce-id')!;
  const topic = header('ce-topic') ?? topicFromSubject;
  if (topic !== topicFromSubject) return { problem: `ce-topic ${JSON.stringify(topic)} does not match the subject's topic ${JSON.stringify(topicFromSubject)}` };
  return {
    envelope: {
      specversion: '1.0',
      id,
      source: header('ce-source')!,
      type: header('ce-type')!,
      time: header('ce-time') ?? new Date(Math.floor(storedAtNanos / 1e6)).toISOString(),
      subject: header('ce-subject'),
      datacontenttype: 'application/json',
      topic,
      partitionkey: header('ce-partitionkey') ?? id,
      tenant: header('ce-tenant'),
      correlationid: header('ce-correlationid') ?? id,
      causationid: header('ce-causationid'),
      traceparent: header('ce-traceparent'),
      tracestate: header('ce-tracestate'),
      data,
    },
  };
}

/** Headers as a plain object, for dead letters (they keep the original message to redrive it as it was). */
export function headersToRecord(h: MsgHdrs | undefined): Record<string, string[]> {
  const record: Record<string, string[]> = {};
  if (h === undefined) return record;
  for (const [key, values] of h) record[key] = [...values];
  return record;
}

export function recordToHeaders(record: Record<string, string[]>): MsgHdrs {
  const h = natsHeaders();
  for (const [key, values] of Object.entries(record)) {
    // The broker's own headers are set afresh by whoever publishes again.
    if (/^nats-/i.test(key)) continue;
    for (const value of values) h.append(key, value);
  }
  return h;
}

// ---- subjects and names ---------------------------------------------------------------------------

/** `<prefix>.<bucket>.<topic>`: a bucket is a fixed slice of the key space (keyHash % buckets). */
export function subjectOf(prefix: string, bucket: number, topic: string): string {
  return `${prefix}.${bucket}.${topic}`;
}

/**
 * A subscription name as a NATS consumer name and KV key token: those cannot contain `.`. Names are words
 * joined by single `.`, `-` or `_` (src/core/contract.ts), so `__` never occurs in one and is unambiguous.
 */
export function nameToken(name: string): string {
  return name.replace(/\./g, '__');
}
