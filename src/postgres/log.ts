import type { Envelope } from '../core/envelope.ts';

/**
 * A row of the log as readers get it (see `statements.readLanes` and `messagesAt`): the envelope's attributes
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
