import type { Envelope } from './envelope.ts';

/**
 * The limits every message is held to, on every backbone. Each one is a limit some backbone would break on
 * later, where the failure would hit a message already written: checked at publish, a message that breaks
 * one is refused with an error naming it (LIMIT_EXCEEDED); received from a producer that did not check
 * (raw SQL, a plain AMQP or NATS client, an older version), it is dead-lettered with the reason before
 * its handler runs. README, "Limits", lists them; test/conformance/hostile.ts tries each.
 */
export const messageLimits = {
  /**
   * Message id, correlation id, causation id and tenant, in UTF-8 bytes: AMQP carries the id in a 255-byte
   * short string, and PostgreSQL's inbox indexes it (a btree entry holds at most ~2.7 kB).
   */
  idBytes: 255,
  /** Partition key and subject, in UTF-8 bytes: held keys are indexed by key on PostgreSQL. */
  keyBytes: 1_024,
  /** `tracestate`, in bytes: W3C Trace Context asks vendors to carry at least 512 characters. */
  traceStateBytes: 512,
  /** Objects and arrays nested in `data`: deeper payloads overflow the stack of JSON encoders (and handlers). */
  depth: 64,
} as const;

/** W3C Trace Context `traceparent`: version, trace id, parent id, flags. */
const TRACEPARENT = /^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/;

/** The UTF-8 length of `text` if it is over `max` bytes, else undefined (measured only when it could be). */
export function bytesOver(text: string, max: number): number | undefined {
  if (text.length * 3 <= max) return undefined;
  const bytes = Buffer.byteLength(text, 'utf8');
  return bytes > max ? bytes : undefined;
}

/** The envelope attributes that are limited, each with its limit. */
const LIMITED: ReadonlyArray<readonly [keyof Envelope, string, number]> = [
  ['id', 'id', messageLimits.idBytes],
  ['correlationid', 'correlation id', messageLimits.idBytes],
  ['causationid', 'causation id', messageLimits.idBytes],
  ['tenant', 'tenant', messageLimits.idBytes],
  ['partitionkey', 'key', messageLimits.keyBytes],
  ['subject', 'subject', messageLimits.keyBytes],
  ['tracestate', 'tracestate', messageLimits.traceStateBytes],
];

/**
 * Why an attribute of a message breaks a limit, if one does: "key is 5000 bytes, over the limit of 1024".
 * `traceparent` must also be well formed (a malformed one is refused at publish; on receive it is only
 * length-checked, as tracing must not cost a message).
 */
export function attributeProblem(attributes: Partial<Record<keyof Envelope, unknown>>, strictTrace: boolean): string | undefined {
  for (const [field, name, max] of LIMITED) {
    const value = attributes[field];
    if (value === undefined || value === null) continue;
    if (typeof value !== 'string') return `${name} must be a string, got ${typeof value}`;
    const bytes = bytesOver(value, max);
    if (bytes !== undefined) return `${name} is ${bytes} bytes, over the limit of ${max}`;
  }
  const traceparent = attributes.traceparent;
  if (traceparent !== undefined && traceparent !== null) {
    if (typeof traceparent !== 'string') return `traceparent must be a string, got ${typeof traceparent}`;
    if (strictTrace ? !TRACEPARENT.test(traceparent) : traceparent.length > 64) {
      return `traceparent ${JSON.stringify(traceparent.slice(0, 80))} is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)`;
    }
  }
  return undefined;
}

/**
 * Why `data` cannot travel as JSON, if it cannot: nested deeper than the limit (or circular), a number JSON
 * cannot carry (NaN and the infinities, which JSON.stringify would silently turn into null), or a BigInt.
 * Values with `toJSON` (dates) are left to it. The path names the offending value: `data.items.3.price`.
 */
export function dataProblem(data: unknown): DataProblem | undefined {
  return walk(data, 'data', 0);
}

interface DataProblem {
  /** LIMIT_EXCEEDED for nesting, INVALID_PAYLOAD for a value JSON cannot carry. */
  readonly code: 'LIMIT_EXCEEDED' | 'INVALID_PAYLOAD';
  readonly message: string;
}

function walk(value: unknown, path: string, depth: number): DataProblem | undefined {
  switch (typeof value) {
    case 'number':
      return Number.isFinite(value) ? undefined : { code: 'INVALID_PAYLOAD', message: `${path} is ${value}, which JSON cannot carry (it would become null)` };
    case 'bigint':
      return { code: 'INVALID_PAYLOAD', message: `${path} is a BigInt, which JSON cannot carry; send it as a string` };
    case 'object': {
      if (value === null || typeof (value as { toJSON?: unknown }).toJSON === 'function') return undefined;
      if (depth >= messageLimits.depth) {
        return { code: 'LIMIT_EXCEEDED', message: `${path} is nested more than ${messageLimits.depth} levels deep (or is circular); flatten it` };
      }
      if (Array.isArray(value)) {
        for (let i = 0; i < value.length; i++) {
          const problem = walk(value[i], `${path}.${i}`, depth + 1);
          if (problem !== undefined) return problem;
        }
        return undefined;
      }
      for (const key in value) {
        if (!Object.hasOwn(value, key)) continue;
        const problem = walk((value as Record<string, unknown>)[key], `${path}.${key}`, depth + 1);
        if (problem !== undefined) return problem;
      }
      return undefined;
    }
    default:
      return undefined;
  }
}

/**
 * Why a received envelope breaks the limits, if it does: its attributes' lengths only. (Its data was
 * parsed already; what a handler could not take, its schema refuses.)
 */
export function envelopeProblem(envelope: Envelope): string | undefined {
  return attributeProblem(envelope, false);
}
