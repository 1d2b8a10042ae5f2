/**
 * The digest tree both sides of a drift check compute: every key hashes into one of `leaves` buckets; a
 * leaf's digest is the XOR of its keys' row hashes; an inner node's digest is the XOR of its children's.
 * XOR is associative, so both sides compute only the leaves in SQL (one grouped scan) and fold the rest
 * in memory. Comparing top-down (root, then only the differing children) exchanges a number of hashes
 * that grows with the number of differing keys, not with the number of keys.
 */

/** Fixed: a replica and its source must agree on the tree's shape, whatever versions they run. */
export const digestTree = {
  leaves: 4096,
  fanout: 16,
  /** Levels below the root: 16^3 = 4096 leaves. */
  depth: 3,
} as const;

/** An empty bucket's digest. Digests travel as decimal text: int8 does not fit a JS number. */
const EMPTY = '0';

/**
 * SQL for what a row's bucket and hash are computed over: the key, or for a tenant's row the tenant and the
 * key (`tenant` is '' for a row of no tenant, so rows of no tenant hash as they did before tenants).
 */
export function identitySql(tenant: string, key: string): string {
  return `(case when ${tenant} = '' then ${key} else ${tenant} || chr(31) || ${key} end)`;
}

/** SQL for a key's bucket (0..4095): the first 32 bits of md5(key). Needs `key` in scope. */
export function bucketSql(key: string): string {
  return `((('x' || substr(md5(${key}), 1, 8))::bit(32)::int) & ${digestTree.leaves - 1})`;
}

/**
 * SQL for a row's hash: 64 bits of md5 over (key, version, md5 of the state's canonical jsonb text).
 * jsonb prints its keys sorted and its whitespace normalised, so equal documents hash equally on both sides.
 */
export function rowHashSql(key: string, version: string, state: string): string {
  return `(('x' || substr(md5(${key} || chr(31) || ${version}::text || chr(31) || md5(${state}::text)), 1, 16))::bit(64)::int8)`;
}

/** XOR of two int8 digests written as decimal text. */
function xor(a: string, b: string): string {
  if (a === EMPTY) return b;
  if (b === EMPTY) return a;
  return BigInt.asIntN(64, BigInt(a) ^ BigInt(b)).toString();
}

/** Leaf digests from SQL rows (bucket, digest); missing buckets are empty. */
export function leavesFrom(rows: readonly { bucket: number | string; digest: string | null }[]): string[] {
  const leaves = new Array<string>(digestTree.leaves).fill(EMPTY);
  for (const row of rows) leaves[Number(row.bucket)] = row.digest ?? EMPTY;
  return leaves;
}

/** Every level of the tree, root first: levels[0] = [root], levels[depth] = the leaves. */
export function buildTree(leaves: readonly string[]): string[][] {
  const levels: string[][] = [[...leaves]];
  let current = levels[0]!;
  for (let level = digestTree.depth; level > 0; level--) {
    const parents = new Array<string>(current.length / digestTree.fanout).fill(EMPTY);
    for (let i = 0; i < current.length; i++) {
      const parent = Math.floor(i / digestTree.fanout);
      parents[parent] = xor(parents[parent]!, current[i]!);
    }
    levels.unshift(parents);
    current = parents;
  }
  return levels;
}

/** The children of `node` at `level` (their indexes at level + 1). */
export function childrenOf(node: number): number[] {
  return Array.from({ length: digestTree.fanout }, (_, i) => node * digestTree.fanout + i);
}

/** Splits `items` into chunks of at most `size`. */
export function chunks<T>(items: readonly T[], size: number): T[][] {
  const result: T[][] = [];
  for (let i = 0; i < items.length; i += size) result.push(items.slice(i, i + size));
  return result;
}
