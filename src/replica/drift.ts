import { newId } from '../core/envelope.ts';
import type { DriftReport } from './define.ts';
import { buildTree, childrenOf, chunks, digestTree, leavesFrom } from './digest.ts';
import type { ReplicaRequest, StateRow } from './protocol.ts';
import type { Traffic } from './requests.ts';
import { identity, type Entry, type ReplicaParts } from './store.ts';

/** What a drift check needs of its replica. */
interface DriftCheck<Row> extends ReplicaParts<Row> {
  readonly maxNodesPerRequest: number;
  readonly maxKeysPerRequest: number;
}

/**
 * Compares a replica with its source, top-down through the digest tree (root, then only the differing
 * children, down to the leaves, then the keys of differing leaves), and repairs the keys that differ with
 * the source's state. The messages exchanged grow with the number of differences, not of keys. Returns the
 * report and the rows the repair wrote; the report is recorded in the meta row.
 */
export async function checkDrift<Row>(
  check: DriftCheck<Row>,
  options: { checkId?: string; repair?: boolean },
): Promise<{ report: DriftReport; written: Array<[string, Entry<Row>]> }> {
  const { store } = check;
  const started = Date.now();
  const checkId = options.checkId ?? newId();
  const traffic: Traffic = { sent: 0, received: 0 };
  let entries = 0;
  const driver = store.driver;
  const meta = await store.readMeta(driver);
  const base = { checkId, replica: check.name, at: new Date(started).toISOString(), ...(check.tenant === undefined ? {} : { tenant: check.tenant }) };
  if (meta.building !== null) {
    const report: DriftReport = {
      ...base,
      durationMs: 0,
      missing: 0,
      extra: 0,
      different: 0,
      repaired: 0,
      samples: { missing: [], extra: [], different: [] },
      messages: traffic,
      entries,
      differingNodes: [],
      skipped: `a rebuild (generation ${meta.building}) is in progress`,
    };
    await store.recordCheck(report);
    return { report, written: [] };
  }
  const { rows: leafRows } = await driver.query<{ bucket: number; digest: string | null }>(store.tables.leafDigests(meta.generation));
  const ours = buildTree(leavesFrom(leafRows));

  // Down the tree: at each level ask for the nodes under the ones that differed.
  let nodes = [0];
  const differingNodes: number[] = [];
  for (let level = 0; level <= digestTree.depth && nodes.length > 0; level++) {
    const requests: ReplicaRequest[] = chunks(nodes, check.maxNodesPerRequest).map((part) => ({
      kind: 'digest',
      requestId: newId(),
      replica: check.name,
      checkId,
      level,
      nodes: part,
    }));
    entries += nodes.length;
    const differing: number[] = [];
    for (const parts of await check.requests.ask(requests, traffic)) {
      for (const reply of parts) {
        if (reply.kind !== 'digest') continue;
        for (const [node, hash] of Object.entries(reply.hashes)) {
          entries++;
          if (ours[level]![Number(node)] !== hash) differing.push(Number(node));
        }
      }
    }
    differing.sort((a, b) => a - b);
    differingNodes.push(differing.length);
    nodes = level < digestTree.depth ? differing.flatMap(childrenOf) : differing;
    if (level === digestTree.depth) break;
  }
  const leaves = differingNodes.length === digestTree.depth + 1 ? nodes : [];

  // The keys of the differing leaves: the source answers with the state of every key that differs.
  // Rows by identity (tenant and key): two tenants' rows of one key are two rows.
  const listed = new Map<string, string>();
  const missing: StateRow[] = [];
  const different: StateRow[] = [];
  const extra: Array<{ tenant: string; key: string }> = [];
  if (leaves.length > 0) {
    const { rows } = await driver.query<{ tenant: string; key: string; bucket: number; hash: string }>(store.tables.keysOfLeaves(meta.generation), [leaves]);
    const byLeaf = new Map<number, Array<[string, string, string?]>>(leaves.map((leaf) => [leaf, []]));
    for (const row of rows) {
      listed.set(identity(row.tenant, row.key), row.hash);
      byLeaf.get(Number(row.bucket))!.push(row.tenant === '' ? [row.key, row.hash] : [row.key, row.hash, row.tenant]);
    }
    // Whole leaves per request, as many as fit in maxKeysPerRequest keys.
    const requests: ReplicaRequest[] = [];
    let group: number[] = [];
    let keys: Array<[string, string, string?]> = [];
    const flush = () => {
      if (group.length === 0) return;
      requests.push({ kind: 'keys', requestId: newId(), replica: check.name, checkId, leaves: group, keys });
      group = [];
      keys = [];
    };
    for (const [leaf, leafKeys] of byLeaf) {
      if (group.length > 0 && keys.length + leafKeys.length > check.maxKeysPerRequest) flush();
      group.push(leaf);
      keys.push(...leafKeys);
    }
    flush();
    entries += listed.size + leaves.length;
    for (const parts of await check.requests.ask(requests, traffic)) {
      for (const reply of parts) {
        if (reply.kind !== 'keys') continue;
        entries += reply.rows.length + reply.absent.length;
        for (const row of reply.rows) (listed.has(identity(row.tenant ?? '', row.key)) ? different : missing).push(row);
        for (const absent of reply.absent) extra.push(typeof absent === 'string' ? { tenant: '', key: absent } : { tenant: absent[1], key: absent[0] });
      }
    }
  }

  let written: Array<[string, Entry<Row>]> = [];
  if (options.repair !== false && missing.length + different.length + extra.length > 0) {
    written = await check.transaction((tx) => store.repair(tx, meta.generation, [...missing, ...different], extra, listed));
  }
  // A tenant's key is shown as tenant/key.
  const sample = (rows: readonly { tenant?: string; key: string }[]) =>
    rows.slice(0, 10).map((row) => (row.tenant === undefined || row.tenant === '' ? row.key : `${row.tenant}/${row.key}`));
  const report: DriftReport = {
    ...base,
    durationMs: Date.now() - started,
    missing: missing.length,
    extra: extra.length,
    different: different.length,
    repaired: written.length,
    samples: { missing: sample(missing), extra: sample(extra), different: sample(different) },
    messages: { ...traffic },
    entries,
    differingNodes,
  };
  await store.recordCheck(report);
  return { report, written };
}
