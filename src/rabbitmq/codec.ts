/**
 * How an envelope travels in an AMQP 0-9-1 message: the CloudEvents AMQP binding, binary content mode. The
 * binding is written for AMQP 1.0; its application-properties are what 0-9-1 calls headers. Every attribute
 * except `datacontenttype` is a header named `cloudEvents:<attribute>` (the binding's prefix; `cloudEvents_`,
 * which some SDKs write for JMS, is read too), `datacontenttype` is the `content_type` property, and the
 * body is the data's JSON alone. `message_id` repeats the id and `timestamp` the time, for plain clients
 * and the management UI.
 *
 * Tidings' own bookkeeping (attempt count, failed-attempt history, dead-letter facts) rides in `x-tidings-*`
 * headers, which CloudEvents consumers ignore.
 */
import type { ConsumeMessage, GetMessage, MessagePropertyHeaders, Options } from 'amqplib';
import type { AttemptRecord, Outgoing } from '../core/backbone.ts';
import { HEADER_ATTRIBUTES, type Envelope } from '../core/envelope.ts';
import { storable, TidingsError, type ErrorRecord } from '../core/errors.ts';

export const CE_PREFIX = 'cloudEvents:';
const CE_PREFIXES = ['cloudEvents:', 'cloudEvents_'] as const;

/** Attempts made before this copy of the message was published (by retries through retry queues). */
export const H_ATTEMPTS = 'x-tidings-attempts';
/** JSON AttemptRecord[] of the failed attempts so far. */
export const H_HISTORY = 'x-tidings-history';
/**
 * The partition queue a retried or redriven message goes back to, matched by the return exchange. Not an
 * `x-` name: a headers exchange ignores `x-` headers when it matches, so every partition would get a copy.
 */
export const H_PARTITION = 'tidings-partition';
export const H_DEAD_ID = 'x-tidings-dead-id';
export const H_DEAD_REASON = 'x-tidings-dead-reason';
export const H_DEAD_AT = 'x-tidings-dead-at';
export const H_SUBSCRIPTION = 'x-tidings-subscription';
export const H_QUEUE = 'x-tidings-queue';
/** Quorum queues count returns of a message (nack with requeue, a consumer that went away) in this header. */
const H_DELIVERY_COUNT = 'x-delivery-count';

/**
 * What AMQP 0-9-1 (and its client here) can carry; a message over one of these can never be published, so
 * `publish` refuses it at once (LIMIT_EXCEEDED) rather than retry it.
 */
export const amqpLimits = {
  /** A short string: `message_id` (the envelope's id), header names. */
  shortStringBytes: 255,
  /**
   * Every header of a message together, encoded: amqplib encodes them into a 64 KiB buffer (and they must
   * fit in one frame, 128 KiB by default on RabbitMQ).
   */
  headerBytes: 65_536,
} as const;

/** Attempt histories are cut to this many UTF-8 bytes (the newest attempts kept), within `amqpLimits.headerBytes`. */
const HISTORY_BYTES = 24 * 1_024;
/** The newest attempts a history keeps, and what each keeps of its error's message and stack. */
const MAX_HISTORY = 20;
const MAX_STACK = 2_000;
/** A header cut to fit the others in (a retried or dead-lettered copy of a message with huge headers). */
const CUT_HEADER_BYTES = 1_024;

/** Buckets of the key hash: messages are routed by `keyHash % BUCKETS`. Part of the wire contract. */
export const BUCKETS = 1_024;
/** log2(BUCKETS): the number of words in a routing key. */
export const BUCKET_BITS = 10;

/**
 * The routing key: the bucket's 10 bits as words, most significant first (bucket 6 is `0.0.0.0.0.0.0.1.1.0`).
 * A binding on the low bits (`#.1.0`: bucket % 4 == 2) then takes a whole partition in one binding when the
 * partition count is a power of two, where decimal keys would need one binding per bucket (1,024 per topic
 * and subscription, seconds to declare). `#` still reads everything.
 */
export function routingKey(keyHash: number): string {
  return bucketKey(keyHash % BUCKETS);
}

export function bucketKey(bucket: number): string {
  return bits(bucket, BUCKET_BITS);
}

/** `value`'s `count` low bits as routing-key words, most significant first. */
export function bits(value: number, count: number): string {
  const words: string[] = [];
  for (let bit = count - 1; bit >= 0; bit--) words.push(String((value >> bit) & 1));
  return words.join('.');
}

export function encode(message: Outgoing): { body: Buffer; options: Options.Publish } {
  const { envelope } = message;
  const headers = attributeHeaders(envelope);
  const time = Date.parse(envelope.time);
  return {
    body: Buffer.from(message.json, 'utf8'),
    options: {
      persistent: true,
      contentType: 'application/json',
      messageId: envelope.id,
      ...(Number.isNaN(time) ? {} : { timestamp: Math.floor(time / 1_000) }),
      headers,
    },
  };
}

/**
 * The envelope's attributes as `cloudEvents:<name>` headers (every attribute but the data and its content
 * type); with `present`, only those it lacks under either prefix: what a delivery derived (a topic from the
 * exchange, a time from now) then travels with a copy of the message.
 */
export function attributeHeaders(envelope: Envelope, present: MessagePropertyHeaders = {}): MessagePropertyHeaders {
  const headers: MessagePropertyHeaders = {};
  for (const name of HEADER_ATTRIBUTES) {
    const value = envelope[name];
    if (value !== undefined && !CE_PREFIXES.some((prefix) => present[prefix + name] !== undefined)) headers[CE_PREFIX + name] = value;
  }
  return headers;
}

/** About how many bytes `headers` take encoded (an AMQP field table). */
function headerBytes(headers: MessagePropertyHeaders): number {
  let bytes = 4;
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined) continue;
    bytes += 2 + Buffer.byteLength(name) + valueBytes(value);
  }
  return bytes;
}

function valueBytes(value: unknown): number {
  if (typeof value === 'string') return 4 + Buffer.byteLength(value);
  if (Buffer.isBuffer(value)) return 4 + value.length;
  if (typeof value === 'number' || typeof value === 'bigint' || value instanceof Date) return 8;
  if (typeof value === 'boolean' || value === null) return 1;
  try {
    return 4 + Buffer.byteLength(JSON.stringify(value) ?? '');
  } catch {
    return 4;
  }
}

/**
 * Why a message can never go to RabbitMQ, if it cannot: an id over a short string, headers over what one
 * message can carry. The error names the limit, the message and its topic.
 */
export function wireProblem(envelope: Envelope, options: Options.Publish): TidingsError | undefined {
  const refuse = (problem: string) => {
    const ref = { id: storable(String(envelope.id), 300), topic: envelope.topic, key: storable(String(envelope.partitionkey), 300) };
    return new TidingsError('LIMIT_EXCEEDED', `Message ${ref.id} on ${envelope.topic} cannot go to RabbitMQ: ${problem}`, { ref });
  };
  const id = String(options.messageId ?? '');
  // Three bytes a character at most: most ids and headers are measured without encoding them.
  const idBytes = id.length * 3 <= amqpLimits.shortStringBytes ? 0 : Buffer.byteLength(id);
  if (idBytes > amqpLimits.shortStringBytes) {
    return refuse(
      `its id is ${idBytes} bytes, over the limit of ${amqpLimits.shortStringBytes} (AMQP carries it in message_id, a short string); give it a shorter id`,
    );
  }
  const headers = options.headers ?? {};
  let bound = 4;
  for (const name in headers) {
    const value = headers[name] as unknown;
    bound += 6 + name.length * 3 + (typeof value === 'string' ? value.length * 3 : valueBytes(value));
  }
  if (bound <= amqpLimits.headerBytes) return undefined;
  const bytes = headerBytes(headers);
  if (bytes <= amqpLimits.headerBytes) return undefined;
  const [largest, size] = Object.entries(headers)
    .map(([name, value]): [string, number] => [name, valueBytes(value)])
    .reduce((a, b) => (b[1] > a[1] ? b : a));
  return refuse(
    `its headers are ${bytes} bytes, over the limit of ${amqpLimits.headerBytes} for one message's headers (the largest, ${largest}, is ${size} bytes); shorten it`,
  );
}

/**
 * `headers` cut to fit a copy of a message within `amqpLimits.headerBytes`: the largest values first, each to
 * 1 KiB with a note of what was cut. Only a message that came with huge headers (a foreign producer's) is
 * cut; its body is never touched, and a copy that cannot be published would leave it stuck.
 */
export function fitHeaders(headers: MessagePropertyHeaders): MessagePropertyHeaders {
  const fitted = { ...headers };
  const budget = amqpLimits.headerBytes - 1_024;
  while (headerBytes(fitted) > budget) {
    const [name, value] = Object.entries(fitted)
      .filter(([, v]) => typeof v === 'string' || Buffer.isBuffer(v))
      .reduce((a, b) => (valueBytes(b[1]) > valueBytes(a[1]) ? b : a), ['', ''] as [string, unknown]);
    if (name === '' || valueBytes(value) <= CUT_HEADER_BYTES + 64) break;
    const text = Buffer.isBuffer(value) ? value.toString('utf8') : (value as string);
    const kept = Buffer.from(text).subarray(0, CUT_HEADER_BYTES).toString('utf8');
    fitted[name] = `${kept}... (cut from ${Buffer.byteLength(text)} bytes to fit AMQP's headers)`;
  }
  return fitted;
}

export interface Decoded {
  readonly envelope: Envelope;
  /** Attempts recorded in headers (made before the message went through a retry queue). */
  readonly priorAttempts: number;
  readonly history: AttemptRecord[];
}

type DecodeResult = { readonly ok: true; readonly value: Decoded } | { readonly ok: false; readonly problem: string; readonly id: string | undefined };

/** Reads an envelope back; never throws: what cannot be read is described for the dead letter. */
export function decode(message: ConsumeMessage | GetMessage, fallbackTopic: string | undefined): DecodeResult {
  const headers = message.properties.headers ?? {};
  const attribute = (name: string): string | undefined => {
    for (const prefix of CE_PREFIXES) {
      const value = headers[prefix + name] as unknown;
      if (typeof value === 'string') return value;
      if (Buffer.isBuffer(value)) return value.toString('utf8');
      if (value instanceof Date) return value.toISOString();
      if (typeof value === 'number' && name === 'time') return new Date(value * 1_000).toISOString();
    }
    return undefined;
  };
  const messageId = typeof message.properties.messageId === 'string' ? message.properties.messageId : undefined;
  const id = attribute('id') ?? messageId;
  const missing = ['specversion', 'source', 'type'].filter((name) => attribute(name) === undefined);
  if (id === undefined) missing.unshift('id');
  if (missing.length > 0) {
    return { ok: false, id, problem: `missing CloudEvents attribute${missing.length === 1 ? '' : 's'} ${missing.join(', ')} (headers ${CE_PREFIX}<name>)` };
  }
  if (attribute('specversion') !== '1.0') return { ok: false, id, problem: `unsupported CloudEvents specversion ${JSON.stringify(attribute('specversion'))}` };
  const contentType = message.properties.contentType as unknown;
  if (contentType !== undefined && (typeof contentType !== 'string' || !/^application\/([\w.+-]+\+)?json\b/i.test(contentType))) {
    return { ok: false, id, problem: `content_type ${JSON.stringify(contentType)} is not JSON` };
  }
  const topic = attribute('topic') ?? fallbackTopic;
  if (topic === undefined) return { ok: false, id, problem: `missing the ${CE_PREFIX}topic header` };
  let data: unknown;
  try {
    data = JSON.parse(message.content.toString('utf8'));
  } catch (error) {
    return { ok: false, id, problem: `the body is not JSON (${(error as Error).message})` };
  }
  const timestamp = typeof message.properties.timestamp === 'number' ? new Date(message.properties.timestamp * 1_000).toISOString() : undefined;
  const envelope: Envelope = {
    specversion: '1.0',
    id: id!,
    source: attribute('source')!,
    type: attribute('type')!,
    time: attribute('time') ?? timestamp ?? new Date().toISOString(),
    subject: attribute('subject'),
    datacontenttype: 'application/json',
    topic,
    // A message from a plain client without a key is its own key: no order to keep.
    partitionkey: attribute('partitionkey') ?? id!,
    tenant: attribute('tenant'),
    correlationid: attribute('correlationid') ?? id!,
    causationid: attribute('causationid'),
    traceparent: attribute('traceparent'),
    tracestate: attribute('tracestate'),
    data,
  };
  return { ok: true, value: { envelope, priorAttempts: attemptsOf(headers), history: historyOf(headers) } };
}

export function attemptsOf(headers: MessagePropertyHeaders): number {
  const value = Number(headers[H_ATTEMPTS] ?? 0);
  return Number.isInteger(value) && value >= 0 ? value : 0;
}

/** Returns counted by a quorum queue; a classic queue only says whether the message was delivered before. */
export function returnsOf(message: ConsumeMessage): number {
  const count = Number(message.properties.headers?.[H_DELIVERY_COUNT] ?? Number.NaN);
  if (Number.isInteger(count) && count >= 0) return count;
  return message.fields.redelivered ? 1 : 0;
}

export function historyOf(headers: MessagePropertyHeaders): AttemptRecord[] {
  const raw = headers[H_HISTORY] as unknown;
  const text = Buffer.isBuffer(raw) ? raw.toString('utf8') : raw;
  if (typeof text !== 'string') return [];
  try {
    const parsed = JSON.parse(text) as unknown;
    return Array.isArray(parsed) ? (parsed as AttemptRecord[]) : [];
  } catch {
    return [];
  }
}

/**
 * The history as a header: the newest records, their messages and stacks cut, at most `HISTORY_BYTES`, so
 * that it always fits in a message's headers beside the rest. (Test: input.rabbitmq 'attempt histories...'.)
 */
export function historyHeader(history: readonly AttemptRecord[]): string {
  const kept: AttemptRecord[] = [];
  let bytes = 2;
  for (const record of history.slice(-MAX_HISTORY).reverse()) {
    let trimmed = { ...record, error: trimError(record.error, MAX_STACK) };
    if (bytes + Buffer.byteLength(JSON.stringify(trimmed)) + 1 > HISTORY_BYTES) {
      if (kept.length > 0) break;
      // The newest attempt is always kept, cut harder if it has to be.
      trimmed = { ...record, error: trimError(record.error, MAX_STACK / 8) };
    }
    kept.unshift(trimmed);
    bytes += Buffer.byteLength(JSON.stringify(trimmed)) + 1;
  }
  return JSON.stringify(kept);
}

function trimError(error: ErrorRecord, max: number): ErrorRecord {
  const message = error.message.length > max ? `${error.message.slice(0, max)}...` : error.message;
  if (error.stack === undefined || error.stack.length <= max) return { ...error, message };
  return { ...error, message, stack: `${error.stack.slice(0, max)}...` };
}

/**
 * The headers of a message to copy (to a delay queue, dead letters, or back), without those that grow on every
 * trip through a delay queue (x-death) or that only the broker sets (x-delivery-count: a copy starts at 0).
 */
export function cleanHeaders(headers: MessagePropertyHeaders | undefined): MessagePropertyHeaders {
  const clean: MessagePropertyHeaders = {};
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (name === 'x-death' || name.startsWith('x-first-death') || name.startsWith('x-last-death') || name === 'x-delivery-count') continue;
    clean[name] = value;
  }
  return clean;
}

/** The publish options of a message copied as it is (to a retry queue, dead letters, or back), headers replaced. */
export function copyOptions(message: ConsumeMessage | GetMessage, headers: MessagePropertyHeaders): Options.Publish {
  const p = message.properties;
  return {
    persistent: true,
    headers,
    ...(p.contentType === undefined ? {} : { contentType: p.contentType as string }),
    ...(p.contentEncoding === undefined ? {} : { contentEncoding: p.contentEncoding as string }),
    ...(p.messageId === undefined ? {} : { messageId: p.messageId as string }),
    ...(p.timestamp === undefined ? {} : { timestamp: p.timestamp as number }),
    ...(p.correlationId === undefined ? {} : { correlationId: p.correlationId as string }),
    ...(p.type === undefined ? {} : { type: p.type as string }),
    ...(p.appId === undefined ? {} : { appId: p.appId as string }),
  };
}
