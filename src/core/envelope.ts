import { randomBytes } from 'node:crypto';

/**
 * A message as it travels and is stored: CloudEvents 1.0 attributes, then Tidings' extensions (lower-case,
 * as CloudEvents requires of extension names), then the data. Every backbone stores and carries exactly this.
 */
export interface Envelope {
  readonly specversion: '1.0';
  readonly id: string;
  /** The publishing service, as a URI reference (`tidings://orders`). */
  readonly source: string;
  /** `<contract name>.v<version>`. */
  readonly type: string;
  /** ISO 8601 time of publication. */
  readonly time: string;
  readonly subject?: string | undefined;
  readonly datacontenttype: 'application/json';
  /** Extension: the topic (contract name) the message is routed by. */
  readonly topic: string;
  /** Extension: the partition key; messages with equal keys keep their order. */
  readonly partitionkey: string;
  readonly tenant?: string | undefined;
  readonly correlationid: string;
  readonly causationid?: string | undefined;
  /** W3C trace context. */
  readonly traceparent?: string | undefined;
  readonly tracestate?: string | undefined;
  readonly data: unknown;
}

/** The attributes a broker carries as headers beside the data (`datacontenttype` is implied), in the order written. */
export const HEADER_ATTRIBUTES = [
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

/** What a handler receives: the envelope's attributes in camelCase and the data typed by the contract. */
export interface Message<Data = unknown> {
  readonly id: string;
  readonly topic: string;
  readonly type: string;
  readonly source: string;
  readonly time: Date;
  readonly subject: string | undefined;
  readonly key: string;
  readonly tenant: string | undefined;
  readonly correlationId: string;
  readonly causationId: string | undefined;
  readonly traceparent: string | undefined;
  readonly tracestate: string | undefined;
  readonly data: Data;
}

/** Random bytes are drawn in blocks: one system call for many ids. */
const POOL_SIZE = 16 * 512;
let pool = Buffer.alloc(0);
let offset = POOL_SIZE;

/** Time-ordered UUID (version 7): ids sort by creation time, which keeps inbox and dead-letter indexes compact. */
export function newId(): string {
  if (offset + 16 > pool.length) {
    pool = randomBytes(POOL_SIZE);
    offset = 0;
  }
  // The pool's bytes are used once: stamp them in place rather than copy them out.
  const at = offset;
  offset += 16;
  pool.writeUIntBE(Date.now(), at, 6);
  pool[at + 6] = (pool[at + 6]! & 0x0f) | 0x70;
  pool[at + 8] = (pool[at + 8]! & 0x3f) | 0x80;
  const hex = pool.toString('hex', at, at + 16);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * A stable 31-bit hash of a partition key (FNV-1a over UTF-8). Every backbone partitions with it, so a key
 * lands in the same partition whichever backbone carries it.
 */
export function keyHash(key: string): number {
  let hash = 0x811c9dc5;
  // ASCII is its own UTF-8: hash the characters without encoding the key.
  for (let i = 0; i < key.length; i++) {
    const code = key.charCodeAt(i);
    if (code >= 0x80) return keyHashUtf8(key);
    hash ^= code;
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0) & 0x7fffffff;
}

function keyHashUtf8(key: string): number {
  let hash = 0x811c9dc5;
  const bytes = Buffer.from(key, 'utf8');
  for (const byte of bytes) {
    hash ^= byte;
    hash = Math.imul(hash, 0x01000193);
  }
  return (hash >>> 0) & 0x7fffffff;
}

export function partitionOf(hash: number, partitions: number): number {
  return hash % partitions;
}

export function toMessage<Data>(envelope: Envelope, data: Data): Message<Data> {
  return {
    id: envelope.id,
    topic: envelope.topic,
    type: envelope.type,
    source: envelope.source,
    time: new Date(envelope.time),
    subject: envelope.subject,
    key: envelope.partitionkey,
    tenant: envelope.tenant,
    correlationId: envelope.correlationid,
    causationId: envelope.causationid,
    traceparent: envelope.traceparent,
    tracestate: envelope.tracestate,
    data,
  };
}
