/**
 * What a service says about itself: the contracts it publishes and the subscriptions it runs, as plain
 * JSON (schemas as JSON Schema). A bus writes this record to its backbone's registry when it starts, and the
 * AsyncAPI document (src/asyncapi) is built from records, the code's or the registry's, so both read alike.
 */
import type { AnyContract } from './contract.ts';
import { TidingsError } from './errors.ts';
import type { ResolvedRetry } from './options.ts';

/** A JSON Schema, as a schema library's converter returns it. */
export type JsonSchema = Record<string, unknown>;

export interface ContractRecord {
  readonly kind: 'event' | 'command';
  readonly name: string;
  readonly version: number;
  /** CloudEvents `type`: `<name>.v<version>`. */
  readonly type: string;
  readonly topic: string;
  readonly description?: string | undefined;
  /**
   * How the partition key is found: the data's field it is read from (`orderId`, `customer.id`), `function`
   * when the key function does more than read one field, or `id` (no key function: the message id).
   */
  readonly key: string;
  /** The data's JSON Schema, as publishers give it; `{}` when the schema could not be converted (see `schemaProblem`). */
  readonly schema: JsonSchema;
  readonly schemaProblem?: string | undefined;
  /** A command that answers: its reply's JSON Schema. */
  readonly reply?: JsonSchema | undefined;
  /** Older versions this one reads through upcasters. */
  readonly upcasts: readonly number[];
}

export interface SubscriptionRecord {
  readonly name: string;
  readonly contracts: readonly ContractRecord[];
  readonly partitions: number;
  readonly concurrency: number;
  readonly retry: ResolvedRetry;
  readonly timeoutMs: number;
  readonly inbox: boolean;
}

export interface ServiceRecord {
  readonly service: string;
  /** The backbone carrying the service's messages, and the settings that name things on it (for AsyncAPI bindings). */
  readonly backbone: BackboneDescription;
  readonly publishes: readonly ContractRecord[];
  readonly subscriptions: readonly SubscriptionRecord[];
}

/** `postgres` with its schema, `rabbitmq` with its prefix, `nats` with its stream and subject prefix, `memory`. */
export interface BackboneDescription {
  readonly name: string;
  readonly settings?: Readonly<Record<string, string | number | boolean>> | undefined;
}

/** A service's record as the registry keeps it: when it was last written. */
export interface RecordedService extends ServiceRecord {
  readonly recordedAt: string;
}

/**
 * Where services record themselves (a table of the PostgreSQL schema, a NATS KV bucket), so that a tool
 * with no code checked out can describe the whole system (`tidings asyncapi --system`).
 */
export interface ContractRegistry {
  /** Writes `service`'s record, replacing the one it wrote before. */
  record(service: ServiceRecord): Promise<void>;
  /** Every service's last record, by service name. */
  services(): Promise<RecordedService[]>;
}

/** What the catalog needs of a bus (core/bus.ts gives it; kept apart so this module stays free of the bus). */
interface CatalogSource {
  readonly service: string;
  readonly publishes: readonly AnyContract[];
  readonly subscriptions: ReadonlyMap<
    string,
    { readonly routes: ReadonlyMap<string, { readonly contract: AnyContract }>; readonly options: SubscriptionSettings }
  >;
  readonly backbone: { readonly name: string; describe?(): BackboneDescription };
}

interface SubscriptionSettings {
  readonly partitions: number;
  readonly concurrency: number;
  readonly retry: ResolvedRetry;
  readonly timeoutMs: number;
  readonly inbox: boolean;
}

/** The service's record; `warn` hears of every schema that could not be converted to JSON Schema. */
export function describeService(source: CatalogSource, warn: (message: string) => void = () => undefined): ServiceRecord {
  const described = new Map<AnyContract, ContractRecord>();
  const record = (contract: AnyContract): ContractRecord => {
    let found = described.get(contract);
    if (found === undefined) {
      found = describeContract(contract);
      if (found.schemaProblem !== undefined) warn(`Service ${source.service}: ${found.schemaProblem}`);
      described.set(contract, found);
    }
    return found;
  };
  const publishes = [...new Map(source.publishes.map((contract) => [contract.topic, contract])).values()].map(record).sort(byTopic);
  const subscriptions = [...source.subscriptions]
    .filter(([, subscription]) => subscription.routes.size > 0)
    .map(([name, { routes, options }]) => ({
      name,
      contracts: [...routes.values()].map((route) => record(route.contract)).sort(byTopic),
      partitions: options.partitions,
      concurrency: options.concurrency,
      retry: { immediate: options.retry.immediate, delayed: [...options.retry.delayed], jitter: options.retry.jitter },
      timeoutMs: options.timeoutMs,
      inbox: options.inbox,
    }))
    .sort((a, b) => a.name.localeCompare(b.name));
  return { service: source.service, backbone: source.backbone.describe?.() ?? { name: source.backbone.name }, publishes, subscriptions };
}

/** One contract as JSON: its schema converted (or `{}` with the reason in `schemaProblem`). */
export function describeContract(contract: AnyContract): ContractRecord {
  const converted = toJsonSchema(contract, contract.schema, contract.toJSONSchema);
  const reply = contract.reply === undefined ? undefined : toJsonSchema(contract, contract.reply, undefined, 'reply');
  const problem = [converted.problem, reply?.problem].filter((text) => text !== undefined).join('; ');
  return {
    kind: contract.kind,
    name: contract.name,
    version: contract.version,
    type: contract.type,
    topic: contract.topic,
    ...(contract.description === undefined ? {} : { description: contract.description }),
    key: keySource(contract),
    schema: converted.schema,
    ...(problem === '' ? {} : { schemaProblem: problem }),
    ...(reply === undefined ? {} : { reply: reply.schema }),
    upcasts: Object.keys(contract.upcast ?? {})
      .map(Number)
      .sort((a, b) => a - b),
  };
}

function byTopic(a: ContractRecord, b: ContractRecord): number {
  return a.topic.localeCompare(b.topic);
}

interface Converted {
  readonly schema: JsonSchema;
  readonly problem?: string | undefined;
}

/** Draft-07: what AsyncAPI 3.0's default schema format (a superset of it) reads. */
const TARGET = 'draft-07';

/**
 * The schema of what a publisher passes (the input: what travels), through Standard JSON Schema when the
 * library offers it (zod 4, arktype), else the contract's `toJSONSchema` hook.
 */
function toJsonSchema(contract: AnyContract, schema: AnyContract['schema'], hook: (() => JsonSchema) | undefined, what = 'schema'): Converted {
  const standard = schema['~standard'] as { vendor?: string; jsonSchema?: { input?: (options: { target: string }) => JsonSchema } };
  const convert = hook ?? (typeof standard.jsonSchema?.input === 'function' ? () => standard.jsonSchema!.input!({ target: TARGET }) : undefined);
  const named = `the ${what} of ${contract.type}`;
  if (convert === undefined) {
    return {
      schema: {},
      problem: `${named} (${standard.vendor ?? 'unknown library'}) cannot be converted to JSON Schema: its library offers no Standard JSON Schema (~standard.jsonSchema); give the contract toJSONSchema: () => ... (documented as {} meanwhile)`,
    };
  }
  try {
    const converted = convert();
    if (converted === null || typeof converted !== 'object' || Array.isArray(converted))
      throw new Error(`it returned ${JSON.stringify(converted)}, not an object`);
    const { $schema: _dialect, ...rest } = converted;
    return { schema: rest };
  } catch (error) {
    return { schema: {}, problem: `${named} cannot be converted to JSON Schema (${(error as Error).message}); documented as {}` };
  }
}

/**
 * Which field the key function reads, found by calling it on a recording stand-in for the data: `orderId`
 * for `(order) => order.orderId`. A function that does more (joins fields, hashes) is `function`.
 */
function keySource(contract: AnyContract): string {
  if (contract.key === undefined) return 'id';
  const read: string[][] = [];
  const stand = (path: string[]): unknown =>
    new Proxy(
      {},
      {
        get(_, property) {
          if (typeof property === 'symbol') return undefined;
          const next = [...path, property];
          read.push(next);
          return stand(next);
        },
      },
    );
  try {
    const result = contract.key(stand([]));
    const last = read.at(-1);
    // Only the deepest path was read, and the function returned what it found there.
    if (last !== undefined && read.every((path) => last.join('.').startsWith(path.join('.'))) && typeof result === 'object') return last.join('.');
  } catch {
    // It did something a stand-in cannot answer: the key is computed.
  }
  return 'function';
}

/** The `publishes` bus option: contracts (defineEvent, defineCommand), checked so a mistake names itself at createBus. */
export function checkPublishes(publishes: readonly AnyContract[] | undefined): readonly AnyContract[] {
  if (publishes === undefined) return [];
  if (!Array.isArray(publishes)) {
    throw new TidingsError('INVALID_OPTIONS', 'Invalid options for createBus: publishes must be an array of contracts, for example [OrderPlaced, ChargeCard]');
  }
  publishes.forEach((contract, index) => {
    if (typeof contract?.topic !== 'string' || typeof contract.schema?.['~standard']?.validate !== 'function') {
      throw new TidingsError('INVALID_OPTIONS', `Invalid options for createBus: publishes[${index}] is not a contract (made by defineEvent or defineCommand)`);
    }
  });
  return Object.freeze([...publishes]);
}

/**
 * Writes the service's record to the backbone's registry, when it has one. A failure is a warning, not a
 * failed start: the registry documents the system, the service works without it.
 */
export async function recordService(
  source: CatalogSource,
  registry: ContractRegistry | undefined,
  warn: (message: string, error?: unknown) => void,
): Promise<void> {
  if (registry === undefined) return;
  try {
    await registry.record(describeService(source, warn));
  } catch (error) {
    warn(
      `Service ${source.service} could not record its contracts in the ${source.backbone.name} registry; tidings asyncapi --system will miss it until its next start`,
      error,
    );
  }
}
