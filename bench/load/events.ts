/** The events every system publishes: a key (one of `keys`, or unique), a sequence number, a filler. */
export interface BenchEvent {
  key: string;
  seq: number;
  payload: string;
}

/** The default filler: the event is ~250 bytes of JSON. */
export const DEFAULT_PAYLOAD_BYTES = 210;

const fillers = new Map<number, string>();
function filler(bytes: number): string {
  let fill = fillers.get(bytes);
  if (fill === undefined) {
    fill = 'x'.repeat(bytes);
    fillers.set(bytes, fill);
  }
  return fill;
}

/** An event of `payloadBytes` filler (~250 B of JSON by default); with `keys` 0 every event has its own key. */
export function makeEvent(seq: number, keys: number, payloadBytes = DEFAULT_PAYLOAD_BYTES): BenchEvent {
  return { key: keys > 0 ? `k${seq % keys}` : `k${seq}`, seq, payload: filler(payloadBytes) };
}
