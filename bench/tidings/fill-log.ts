/**
 * A large backlog written straight into a Tidings schema's log by PostgreSQL itself, for the scaling rows
 * (time to first message vs backlog, issue 24) and `npm run bench:memory`: 1,000,000 events published with
 * `publishMany` take longer than the benchmark's watchdog on a busy machine, and what is measured there is
 * the consumer, not how the backlog was written.
 *
 * The rows are those a `publishMany` of the bench's events writes (bench/load/events.ts; src/postgres/codec.ts
 * has the columns): topic, type and source of `bench.event` from service `bench`, time-ordered UUIDv7-shaped
 * ids (the inbox's index grows at its end, as with Tidings' ids), the correlation id the id, the key's hash
 * as Tidings computes it, the data `{ key, seq, payload }`. One INSERT per transaction of `perTransaction`
 * rows, as the bench's publishers commit them: the log's identity numbers the positions, its default takes
 * each transaction's xid and migration 017's statement trigger runs, as for a publisher's rows.
 */
import type pg from 'pg';
import { DEFAULT_PAYLOAD_BYTES } from '../load/events.ts';

export interface LogFill {
  /** The schema of a migrated Tidings backbone. */
  schema: string;
  events: number;
  /** Distinct keys `k0` ... (as bench/load/events.ts names them), with their hashes as Tidings computes them (`keyHash`). */
  keyHashes: readonly number[];
  /** Rows per transaction (one INSERT each); 1,000 by default, a bench `publishMany` call. */
  perTransaction?: number;
  payloadBytes?: number;
}

/** Appends `events` events (seq 0 ... events - 1) to the log. */
export async function fillLog(client: pg.Client, fill: LogFill): Promise<void> {
  const { schema, events, keyHashes } = fill;
  const perTransaction = fill.perTransaction ?? 1_000;
  if (keyHashes.length === 0) throw new Error('fillLog: keyHashes is empty; the backlog needs at least one key');
  // The id: this fill's start in ms (48 bits), version 7, then the event's seq in the next 24 bits: ordered and unique.
  const msHex = Date.now().toString(16).padStart(12, '0');
  for (let from = 0; from < events; from += perTransaction) {
    const to = Math.min(events, from + perTransaction);
    await client.query(
      `insert into ${schema}.log (topic, id, type, source, time, key, key_hash, correlation_id, data)
       select 'bench.event', e.id, 'bench.event.v1', 'tidings://bench', now(), e.key, ($4::int[])[n % $5 + 1], e.id,
         jsonb_build_object('key', e.key, 'seq', n, 'payload', repeat('x', $6))
       from generate_series($1::int, $2::int - 1) as n,
         lateral (select 'k' || (n % $5) as key,
           $3 || '-7' || lpad(to_hex(n >> 12), 3, '0') || '-8' || lpad(to_hex(n & 4095), 3, '0') || '-' || substr(md5(n::text), 1, 12) as id) as e
       order by n`,
      [from, to, `${msHex.slice(0, 8)}-${msHex.slice(8)}`, keyHashes, keyHashes.length, fill.payloadBytes ?? DEFAULT_PAYLOAD_BYTES],
    );
  }
}
