/** Reading a KV bucket's live entries under a key filter: the workers of a subscription, a bucket's holds. */
import type { KV, KvEntry } from 'nats';

/**
 * The current value of every key matching `filter` (a KV key with `*`/`>` wildcards), read now: the keys
 * through one listing, then their values. A key deleted or expired in between is left out.
 */
export async function readEntries(kv: KV, filter: string): Promise<KvEntry[]> {
  const keys: string[] = [];
  for await (const key of await kv.keys(filter)) keys.push(key);
  const entries = await Promise.all(keys.map((key) => kv.get(key)));
  return entries.filter((entry): entry is KvEntry => entry !== null && entry.operation === 'PUT');
}
