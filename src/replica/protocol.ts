/**
 * The messages a replica and its source exchange, on Tidings topics like any other (no service calls
 * another directly):
 *
 *   tidings.replica.<source>.request          replica -> source: digests, keys to compare, a page of state
 *   tidings.replica.<source>.reply.<replica>  source -> that replica: the answers, in one or more parts
 *   tidings.replica.<replica>.check           anyone (the CLI) -> the replica: run a drift check now
 *   tidings.replica.<replica>.rebuild         anyone (the CLI) -> the replica: rebuild by state transfer now
 *
 * Every request carries a `requestId` and the replica's name; every reply names the request and says how
 * many parts answer it, so the replica knows when it has the whole answer.
 */
import type { StandardSchemaV1 } from '../core/standard-schema.ts';
import { defineCommand, defineEvent, type Contract } from '../core/contract.ts';

/** A key's state as the source sees it: the document the replica stores, its version, and its tenant (absent: none). */
export interface StateRow {
  readonly tenant?: string;
  readonly key: string;
  readonly version: number;
  readonly state: unknown;
}

export type ReplicaRequest =
  /** The digests of these nodes of the tree at `level` (0 = the root). */
  | {
      readonly kind: 'digest';
      readonly requestId: string;
      readonly replica: string;
      readonly checkId: string;
      readonly level: number;
      readonly nodes: readonly number[];
    }
  /**
   * The replica's keys (and row hashes, and tenants where there is one) in these leaves: answer with the
   * state of every key that differs.
   */
  | {
      readonly kind: 'keys';
      readonly requestId: string;
      readonly replica: string;
      readonly checkId: string;
      readonly leaves: readonly number[];
      readonly keys: readonly (readonly [key: string, hash: string, tenant?: string])[];
    }
  /** A page of the source's state in tenant and key order, after (`afterTenant`, `after`) (`after` null: from the start). */
  | {
      readonly kind: 'page';
      readonly requestId: string;
      readonly replica: string;
      readonly after: string | null;
      readonly afterTenant?: string;
      readonly limit: number;
    };

export type ReplicaReply =
  | {
      readonly kind: 'digest';
      readonly requestId: string;
      readonly part: number;
      readonly parts: number;
      readonly level: number;
      readonly hashes: Record<string, string>;
    }
  | {
      readonly kind: 'keys';
      readonly requestId: string;
      readonly part: number;
      readonly parts: number;
      /** Keys whose state differs from the replica's, or that the replica lacks. */
      readonly rows: readonly StateRow[];
      /** Keys the replica has that the source does not: a key of no tenant, or [key, tenant]. */
      readonly absent: readonly (string | readonly [key: string, tenant: string])[];
    }
  | {
      readonly kind: 'page';
      readonly requestId: string;
      readonly part: number;
      readonly parts: number;
      readonly rows: readonly StateRow[];
      readonly total: number | null;
    };

export interface RebuildCommand {
  readonly rebuildId: string;
  readonly requestedBy: string;
}

export interface CheckCommand {
  readonly checkId: string;
  readonly requestedBy: string;
}

/**
 * A schema for our own messages: written and read only by this module, so a shape check is enough; with
 * its JSON Schema, for the services' AsyncAPI documents (core/catalog.ts).
 */
function shape<T>(what: string, fields: readonly string[]): { schema: StandardSchemaV1<T, T>; toJSONSchema: () => Record<string, unknown> } {
  return { schema: shapeCheck<T>(what, fields), toJSONSchema: () => ({ type: 'object', required: [...fields] }) };
}

function shapeCheck<T>(what: string, fields: readonly string[]): StandardSchemaV1<T, T> {
  return {
    '~standard': {
      version: 1,
      vendor: 'tidings',
      validate(value) {
        if (typeof value !== 'object' || value === null) return { issues: [{ message: `${what} must be an object` }] };
        const missing = fields.filter((field) => !(field in value));
        if (missing.length > 0) return { issues: missing.map((field) => ({ message: `${what} needs ${field}`, path: [field] })) };
        return { value: value as T };
      },
    },
  };
}

export function requestContract(source: string): Contract<string, ReplicaRequest, ReplicaRequest> {
  return defineCommand(`tidings.replica.${source}.request`, {
    ...shape<ReplicaRequest>('a replica request', ['kind', 'requestId', 'replica']),
    key: (request) => request.requestId,
    description: `Requests from replicas of ${source}: digests, keys to compare, pages of state.`,
  });
}

export function replyContract(source: string, replica: string): Contract<string, ReplicaReply, ReplicaReply> {
  return defineEvent(`tidings.replica.${source}.reply.${replica}`, {
    ...shape<ReplicaReply>('a replica reply', ['kind', 'requestId', 'part', 'parts']),
    key: (reply) => reply.requestId,
    description: `Answers of ${source} to the replica ${replica}.`,
  });
}

export function checkContract(replica: string): Contract<string, CheckCommand, CheckCommand> {
  return defineCommand(`tidings.replica.${replica}.check`, {
    ...shape<CheckCommand>('a drift check command', ['checkId']),
    key: (command) => command.checkId,
    description: `Asks the replica ${replica} to compare itself with its source now (tidings drift check).`,
  });
}

export function rebuildContract(replica: string): Contract<string, RebuildCommand, RebuildCommand> {
  return defineCommand(`tidings.replica.${replica}.rebuild`, {
    ...shape<RebuildCommand>('a rebuild command', ['rebuildId']),
    key: (command) => command.rebuildId,
    description: `Asks the replica ${replica} to rebuild itself from its source's state now (tidings replica rebuild); it reports progress in its meta row.`,
  });
}
