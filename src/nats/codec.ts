/**
 * How a Tidings envelope travels on NATS: the CloudEvents NATS protocol binding in binary content mode.
 * Each attribute is a `ce-<name>` header, `content-type` carries `datacontenttype`, and the payload is the
 * data as JSON text, so a plain NATS client reads the event without knowing Tidings.
 */
import type { MsgHdrs } from '@nats-io/transport-node';
import { client } from './client.ts';
import type { Outgoing } from '../core/backbone.ts';
import { HEADER_ATTRIBUTES, type Envelope } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';

/** Set on a redriven message: only this subscription handles it; the others acknowledge it unseen. */
export const REDRIVE_FOR = 'tidings-redrive-for';

/**
 * Header values are percent-encoded by the HTTP binding's rule (space, `"`, `%` and anything outside printable
 * ASCII), since a NATS header value cannot hold a line break. Ordinary ids, types and keys pass unchanged.
 */
function encodeValue(value: string): string {
  return /[^\x21-\x7e]|["%]/.test(value) ? value.replace(/[^\x21-\x7e]|["%]/gu, (c) => encodeURIComponent(c).replace(/"/g, '%22')) : value;
}

function decodeValue(value: string): string {
  if (!value.includes('%')) return value;
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

/** Throws a URIError for text holding a lone surrogate (no UTF-8 for it): see toWire. */
export function toHeaders(envelope: Envelope): MsgHdrs {
  const h = client().transport.headers();
  for (const name of HEADER_ATTRIBUTES) {
    const value = envelope[name];
    if (value !== undefined && value !== null) h.set(`ce-${name}`, encodeValue(String(value)));
  }
  h.set('content-type', encodeValue(envelope.datacontenttype));
  return h;
}

/** What NATS refuses for good, beyond the limits every backbone holds a message to (src/core/limits.ts). */
const natsLimits = {
  /** JetStream refuses a message whose header block (every `ce-` attribute, the key and ids among them) is larger. */
  headerBytes: 65_535,
  /**
   * A subject, in bytes: nats-server's max_control_line (4,096 by default) holds it with the reply inbox and
   * two lengths, and closes the connection on a longer line (every publish on it then times out).
   */
  subjectBytes: 3_840,
} as const;

/** A subject as NATS reads it: tokens joined by ".", none empty, no space, `*` or `>` (which would be wildcards). */
const SUBJECT = /^[^\s.*>]+(?:\.[^\s.*>]+)*$/;

/** A message as NATS carries it: the `ce-` headers with `Nats-Msg-Id`, and the data as JSON. */
interface Wire {
  readonly subject: string;
  readonly headers: MsgHdrs;
  readonly payload: Uint8Array;
}

/**
 * Encodes a message for NATS, or throws a TidingsError (`retryable: false`, the limit named, the message in
 * `ref`) for a message NATS can never take, before anything is sent: a header that cannot be encoded, headers
 * over JetStream's limit, a message over the server's max_payload, a subject NATS would not read as one. The
 * outbox relay sets such a message aside (src/outbox/index.ts); one that could take later (the server down) is
 * only known when publishing. `maxPayload` is the server's, as it announced it (`nc.info.max_payload`).
 */
export function toWire(message: Outgoing, subject: string, maxPayload: number): Wire {
  const { envelope } = message;
  const refuse = (code: 'LIMIT_EXCEEDED' | 'INVALID_PAYLOAD', problem: string, fix: string): TidingsError =>
    new TidingsError(code, `NATS cannot take message ${abridged(envelope.id)} (${envelope.topic}): ${problem}; ${fix}`, {
      ref: { id: envelope.id, topic: envelope.topic, key: envelope.partitionkey },
      retryable: false,
    });
  if (Buffer.byteLength(subject) > natsLimits.subjectBytes) {
    throw refuse(
      'LIMIT_EXCEEDED',
      `its subject is ${Buffer.byteLength(subject)} bytes, over the limit of ${natsLimits.subjectBytes} (NATS' max_control_line)`,
      'use a shorter topic or subjectPrefix',
    );
  }
  if (!SUBJECT.test(subject))
    throw refuse(
      'INVALID_PAYLOAD',
      `its subject ${JSON.stringify(abridged(subject))} is not NATS subject tokens`,
      'a topic must have no space, "*", ">" or empty part',
    );
  let headers: MsgHdrs;
  let msgId: string;
  try {
    headers = toHeaders(envelope);
    msgId = encodeValue(envelope.id);
  } catch (error) {
    if (!(error instanceof URIError)) throw refuse('INVALID_PAYLOAD', `its headers cannot be encoded (${(error as Error).message})`, 'check its attributes');
    const name = HEADER_ATTRIBUTES.find((attribute) => {
      try {
        encodeValue(String(envelope[attribute] ?? ''));
        return false;
      } catch {
        return true;
      }
    });
    throw refuse(
      'INVALID_PAYLOAD',
      `its ${name ?? 'id'} holds a lone surrogate (half of a UTF-16 pair), which has no UTF-8 form for a NATS header`,
      'send well-formed text',
    );
  }
  // JetStream keeps one copy of a message id within the duplicate window (a relay's retry is stored once).
  headers.set('Nats-Msg-Id', msgId);
  // "NATS/1.0\r\n", a "name: value\r\n" line per value (values are ASCII once encoded), a closing "\r\n".
  let headerBytes = 12;
  for (const [name, values] of headers) for (const value of values) headerBytes += name.length + value.length + 4;
  if (headerBytes > natsLimits.headerBytes) {
    throw refuse(
      'LIMIT_EXCEEDED',
      `its headers are ${headerBytes} bytes, over JetStream's limit of ${natsLimits.headerBytes}`,
      'the key, ids and subject travel in headers: shorten them',
    );
  }
  const payload = Buffer.from(message.json);
  if (headerBytes + payload.byteLength > maxPayload) {
    throw refuse(
      'LIMIT_EXCEEDED',
      `it is ${headerBytes + payload.byteLength} bytes with its headers, over the server's max_payload of ${maxPayload}`,
      'send less data, or raise max_payload in nats-server',
    );
  }
  return { subject, headers, payload };
}

function abridged(text: string): string {
  return text.length > 120 ? `${text.slice(0, 120)}... (${text.length} characters)` : text;
}

export function header(h: MsgHdrs | undefined, name: string): string | undefined {
  if (h === undefined || !h.has(name, client().transport.Match.IgnoreCase)) return undefined;
  return decodeValue(h.get(name, client().transport.Match.IgnoreCase));
}

/** A message's headers by lower-case name, each its first value decoded (what `header` gives, for one name). */
type HeaderFields = ReadonlyMap<string, string>;

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
type Decoded = { readonly envelope: Envelope; readonly problem?: undefined } | { readonly envelope?: undefined; readonly problem: string };

/**
 * Reads a message back into an envelope. Required: `ce-specversion` 1.0, `ce-id`, `ce-source`, `ce-type`
 * and a JSON payload. Tidings' own extensions default for foreign CloudEvents producers: the topic comes from
 * the subject, the key is the id (no order), the correlation id is the id, the time is the stream's.
 */
export function decode(fields: HeaderFields, payload: Uint8Array, topicFromSubject: string, storedAtNanos: number): Decoded {
  const header = (name: string) => fields.get(name);
  const missing = ['specversion', 'id', 'source', 'type'].filter((name) => !header(`ce-${name}`));
  if (missing.length > 0)
    return { problem: `no CloudEvents attribute${missing.length > 1 ? 's' : ''} ${missing.map((m) => `ce-${m}`).join(', ')} in its headers` };
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
  if (topic !== topicFromSubject)
    return { problem: `ce-topic ${JSON.stringify(topic)} does not match the subject's topic ${JSON.stringify(topicFromSubject)}` };
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
  const h = client().transport.headers();
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
