/** The events every system publishes: a key (one of `keys`, or unique), a sequence number, ~250 B of JSON. */
export interface BenchEvent {
  key: string;
  seq: number;
  payload: string;
}

const FILL = 'x'.repeat(210);
/** ~250 bytes of JSON. */
export function makeEvent(seq: number, keys: number): BenchEvent {
  return { key: keys > 0 ? `k${seq % keys}` : `k${seq}`, seq, payload: FILL };
}
