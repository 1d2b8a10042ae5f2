/** Reading a KV bucket's live entries under a key filter: the workers of a subscription, a bucket's holds. */
import type { JetStreamManager } from '@nats-io/jetstream';
import type { KV, KvEntry } from '@nats-io/kv';

/**
 * The current value of every key of KV bucket `bucket` matching `filter` (a key with `*`/`>` wildcards), read
 * now: the keys from the bucket's stream info (the subjects it holds messages on), then their values. A key
 * deleted or expired in between is left out. Not `kv.keys()`: it reads through an ordered consumer, one
 * made per call, and one whose last entry expired (the leases bucket's entries do, and a stopped worker's
 * delete marker too) before it was delivered waited for a heartbeat; in the conformance suite a heartbeat of
 * a worker hung there for good now and then, and its `stop()` with it.
 */
export async function readEntries(jsm: JetStreamManager, kv: KV, bucket: string, filter: string): Promise<KvEntry[]> {
  const prefix = `$KV.${bucket}.`;
  const info = await jsm.streams.info(`KV_${bucket}`, { subjects_filter: `${prefix}${filter}` });
  const keys = Object.keys(info.state.subjects ?? {}).map((subject) => subject.slice(prefix.length));
  const entries = await Promise.all(keys.map((key) => kv.get(key)));
  return entries.filter((entry): entry is KvEntry => entry !== null && entry.operation === 'PUT');
}
