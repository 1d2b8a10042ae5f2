/**
 * The owning service's side of replication: it answers replicas' requests for digests, for the state of
 * the keys that differ, and for pages of its whole state (a state transfer), over the bus. It reads its
 * own data with one SQL query the service declares, so digests of 100,000 keys are one grouped scan.
 */
import type { Bus } from '../core/bus.ts';
import { validateName } from '../core/contract.ts';
import { OptionProblems } from '../core/options.ts';
import type { PgTransaction } from '../postgres/transaction.ts';
import { buildTree, chunks, leavesFrom } from './digest.ts';
import { sourceStatements } from './sql.ts';
import { identity } from './store.ts';
import { replyContract, requestContract, type ReplicaReply, type ReplicaRequest, type StateRow } from './protocol.ts';

export interface SourceDefinition {
  /** The name replicas refer to (`identity.users`); it is part of the request and reply topics. */
  readonly name: string;
  /**
   * A query over the owner's tables returning one row per live key: `key` (text), `version` (int8, grows
   * with every change of the key) and `state` (jsonb, the document replicas store). Deleted keys are
   * absent. Replicas compare `state` by content, so build it the way the events build the replica's row.
   */
  readonly select: string;
  /**
   * The owner's data belongs to tenants, and `select` returns a `tenant` column too (text, null for a row of
   * no tenant): a key is then unique per tenant, and replicas keep each row with its tenant.
   */
  readonly tenants?: boolean;
}

export function defineSource(definition: SourceDefinition): SourceDefinition {
  validateName('Source', definition?.name);
  const problems = new OptionProblems(`defineSource ${definition.name}`);
  problems.check(
    typeof definition.select === 'string' && /^\s*(select|with)\b/i.test(definition.select),
    'select must be a SQL query (select ... or with ...) returning key, version and state',
  );
  problems.oneOf('tenants', definition.tenants, [true, false]);
  problems.throwIfAny();
  return Object.freeze({ ...definition });
}

export interface SourceOptions {
  /** The subscription answering replicas' requests. */
  subscription?: string;
  /** Keys with their state per reply message. */
  maxRowsPerReply?: number;
  /** How long a check's snapshot of the leaf digests is kept, so one check reads the source's data once. */
  digestCacheMs?: number;
}

export const sourceDefaults = {
  subscription: undefined as string | undefined,
  maxRowsPerReply: 500,
  digestCacheMs: 60_000,
} satisfies Record<keyof SourceOptions, unknown>;

export interface SourceStats {
  /** Requests answered, by kind. */
  readonly requests: { digest: number; keys: number; page: number };
  /** Reply messages published. */
  readonly replies: number;
}

export interface ReplicaSource {
  readonly definition: SourceDefinition;
  stats(): SourceStats;
}

/** Answers replicas of `definition` on `bus` (registers a subscription; start the bus as usual). */
export function source(bus: Bus<PgTransaction>, definition: SourceDefinition, options: SourceOptions = {}): ReplicaSource {
  const problems = new OptionProblems(`source ${definition.name}`);
  problems.integer('maxRowsPerReply', options.maxRowsPerReply, 1, 10_000);
  problems.integer('digestCacheMs', options.digestCacheMs, 0);
  problems.throwIfAny();
  const maxRows = options.maxRowsPerReply ?? sourceDefaults.maxRowsPerReply;
  const cacheMs = options.digestCacheMs ?? sourceDefaults.digestCacheMs;
  const sql = sourceStatements(definition.select, definition.tenants === true);
  const replies = new Map<string, ReturnType<typeof replyContract>>();
  const trees = new Map<string, { at: number; tree: Promise<string[][]> }>();
  const counts = { requests: { digest: 0, keys: 0, page: 0 }, replies: 0 };

  const reply = async (tx: PgTransaction, to: string, parts: ReplicaReply[]) => {
    let contract = replies.get(to);
    if (contract === undefined) {
      contract = replyContract(definition.name, to);
      replies.set(to, contract);
    }
    await bus.publishMany(contract, parts, { tx });
    counts.replies += parts.length;
  };

  // Kept by tenant and check: on a backbone per tenant one check id runs in every stamp, each stamp's data its own.
  const treeOf = (tx: PgTransaction, tenant: string | undefined, checkId: string): Promise<string[][]> => {
    const now = Date.now();
    for (const [id, entry] of trees) if (now - entry.at > cacheMs) trees.delete(id);
    const id = identity(tenant ?? '', checkId);
    let entry = trees.get(id);
    if (entry === undefined) {
      const tree = tx.query<{ bucket: number; digest: string | null }>(sql.digests).then((result) => buildTree(leavesFrom(result.rows)));
      entry = { at: now, tree };
      trees.set(id, entry);
      tree.catch(() => trees.delete(id));
    }
    return entry.tree;
  };

  bus.subscribe(
    options.subscription ?? `replica-source.${definition.name}`,
    requestContract(definition.name),
    async (message, ctx) => {
      const request: ReplicaRequest = message.data;
      counts.requests[request.kind]++;
      if (request.kind === 'digest') {
        const level = (await treeOf(ctx.tx, message.tenant, request.checkId))[request.level] ?? [];
        const hashes: Record<string, string> = {};
        for (const node of request.nodes) hashes[node] = level[node] ?? '0';
        await reply(ctx.tx, request.replica, [{ kind: 'digest', requestId: request.requestId, part: 0, parts: 1, level: request.level, hashes }]);
        return;
      }
      if (request.kind === 'keys') {
        const { rows } = await ctx.tx.query<{ tenant: string; key: string; version: string | number; state: unknown; hash: string }>(sql.keysOfLeaves, [
          request.leaves,
        ]);
        const theirs = new Map(request.keys.map(([key, hash, tenant = '']) => [identity(tenant, key), { key, hash, tenant }]));
        const differing: StateRow[] = [];
        for (const row of rows) {
          const id = identity(row.tenant, row.key);
          if (theirs.get(id)?.hash !== row.hash) differing.push(stateRow(row));
          theirs.delete(id);
        }
        const absent = [...theirs.values()].map(({ key, tenant }) => (tenant === '' ? key : ([key, tenant] as const)));
        const rowChunks = chunks(differing, maxRows);
        const absentChunks = chunks(absent, maxRows * 10);
        const parts = Math.max(1, rowChunks.length + absentChunks.length);
        const messages: ReplicaReply[] = [
          ...rowChunks.map((chunk, i) => ({ kind: 'keys' as const, requestId: request.requestId, part: i, parts, rows: chunk, absent: [] })),
          ...absentChunks.map((chunk, i) => ({
            kind: 'keys' as const,
            requestId: request.requestId,
            part: rowChunks.length + i,
            parts,
            rows: [],
            absent: chunk,
          })),
        ];
        if (messages.length === 0) messages.push({ kind: 'keys', requestId: request.requestId, part: 0, parts, rows: [], absent: [] });
        await reply(ctx.tx, request.replica, messages);
        return;
      }
      // A page of a state transfer, in key order: the next request starts after its last key.
      const limit = Math.min(request.limit, maxRows * 10);
      const { rows } = await ctx.tx.query<{ tenant: string; key: string; version: string | number; state: unknown }>(sql.page, [
        request.afterTenant ?? '',
        request.after,
        limit,
      ]);
      const total = request.after === null ? Number((await ctx.tx.query<{ n: string }>(sql.count)).rows[0]!.n) : null;
      const pages = chunks(rows.map(stateRow), maxRows);
      if (pages.length === 0) pages.push([]);
      await reply(
        ctx.tx,
        request.replica,
        pages.map((chunk, part) => ({ kind: 'page' as const, requestId: request.requestId, part, parts: pages.length, total, rows: chunk })),
      );
    },
    // Cross-tenant: a source answers for every tenant's rows (with tenant isolation, its `select` runs in the
    // scope that sees all of them, as the restricted role: grant that role select on the tables it reads).
    { startFrom: 'now', crossTenant: true },
  );

  return {
    definition,
    stats: () => ({ requests: { ...counts.requests }, replies: counts.replies }),
  };
}

/** A row of the source's answer: its tenant only where it has one, so sources without tenants answer as before. */
function stateRow(row: { tenant: string; key: string; version: string | number; state: unknown }): StateRow {
  const state = { key: row.key, version: Number(row.version), state: row.state };
  return row.tenant === '' ? state : { tenant: row.tenant, ...state };
}
