import type { StandardSchemaV1 } from './standard-schema.ts';
import { TidingsError, ValidationError, type MessageRef, type ValidationIssue } from './errors.ts';

/**
 * A contract names one kind of message, its version and schema, and how to find its partition key.
 * Events are facts, fanned out to every subscription of their topic; commands ask one service to act.
 * One contract object is the single source of types for `publish`, handlers and (later) AsyncAPI.
 */
export interface Contract<Name extends string = string, Input = unknown, Output = Input> {
  readonly kind: 'event' | 'command';
  /** Dotted, lower-case name; also the topic the message travels on (`orders.order-placed`). */
  readonly name: Name;
  readonly version: number;
  /** CloudEvents `type`: `<name>.v<version>`. */
  readonly type: string;
  readonly topic: string;
  readonly schema: StandardSchemaV1<Input, Output>;
  /** Returns the partition key: messages with equal keys are handled in order, one at a time. */
  readonly key: ((data: Output) => string) | undefined;
  readonly description: string | undefined;
  /** A command's answer to `bus.request` (see RequestContract); undefined otherwise. */
  readonly reply?: StandardSchemaV1 | undefined;
  /** How to read messages of older versions: version -> a function returning this version's data. */
  readonly upcast?: Readonly<Record<number, Upcaster<Input>>> | undefined;
  /** The schema as JSON Schema, for a schema library without Standard JSON Schema (see ContractOptions). */
  readonly toJSONSchema?: (() => Record<string, unknown>) | undefined;
  /** Publishing it without a tenant fails with TENANT_REQUIRED (core/tenant.ts). */
  readonly requireTenant?: boolean | undefined;
}

/**
 * Turns the data of an older version into this version's input. Declared as a method so that an upcaster
 * written for a typed older shape (`(v1: OrderPlacedV1) => ...`) is accepted, while an inline one gets
 * `unknown` to narrow: the old data arrives as it was stored, unvalidated.
 */
export type Upcaster<Input> = { bivariant(old: unknown): Input }['bivariant'];

/**
 * A command that answers: its handler returns the reply, validated by `reply`, and `bus.request` waits for
 * it, typed by `reply`'s output.
 */
export interface RequestContract<Name extends string = string, Input = unknown, Output = Input, ReplyInput = unknown, ReplyOutput = ReplyInput>
  extends Contract<Name, Input, Output> {
  readonly kind: 'command';
  readonly reply: StandardSchemaV1<ReplyInput, ReplyOutput>;
}

// biome-ignore lint/suspicious/noExplicitAny: the key function makes Contract invariant in its data
export type AnyContract = Contract<string, any, any>;

/** The data a publisher passes for a contract. */
// biome-ignore lint/suspicious/noExplicitAny: the parts not inferred match any contract (Contract is invariant)
export type InputOf<C> = C extends Contract<string, infer I, any> ? I : never;
/** The data a handler receives for a contract. */
// biome-ignore lint/suspicious/noExplicitAny: the parts not inferred match any contract (Contract is invariant)
export type DataOf<C> = C extends Contract<string, any, infer O> ? O : never;
// biome-ignore lint/suspicious/noExplicitAny: as AnyContract
export type AnyRequestContract = RequestContract<string, any, any, any, any>;
/** What a request's handler returns. */
// biome-ignore lint/suspicious/noExplicitAny: the parts not inferred match any contract (Contract is invariant)
export type ReplyInputOf<C> = C extends RequestContract<string, any, any, infer R, any> ? R : never;
/** What `bus.request` resolves to. */
// biome-ignore lint/suspicious/noExplicitAny: the parts not inferred match any contract (Contract is invariant)
export type ReplyOf<C> = C extends RequestContract<string, any, any, any, infer R> ? R : never;

export interface ContractOptions<S extends StandardSchemaV1> {
  version?: number;
  schema: S;
  key?: (data: StandardSchemaV1.InferOutput<S>) => string;
  description?: string;
  /**
   * For a version above 1: how to read each older version, `{ 1: (v1) => v2Data }`. Each upcaster returns
   * this version's data (compose them for a version 3). A consumer then receives older messages upcast and
   * validated as this version; an older version without an upcaster is validated as it is, and goes to dead
   * letters with the reason if it does not fit.
   */
  upcast?: Record<number, Upcaster<StandardSchemaV1.InferInput<S>>>;
  /**
   * The schema as JSON Schema, for AsyncAPI documents and the contracts registry, when the schema library
   * does not offer Standard JSON Schema (`~standard.jsonSchema`; zod 4 does): for example valibot's
   * `() => toJsonSchema(schema)` from @valibot/to-json-schema.
   */
  toJSONSchema?: () => Record<string, unknown>;
  /** Every message of this contract belongs to a tenant: publishing one without fails with TENANT_REQUIRED. */
  requireTenant?: boolean;
}

const NAME = /^[a-z0-9]+(?:[._-][a-z0-9]+)*$/;
export const MAX_NAME_LENGTH = 200;

/** A topic, contract or subscription name: lower-case words joined by `.`, `-` or `_`. */
export function validateName(kind: string, name: unknown): string {
  if (typeof name !== 'string' || !NAME.test(name) || name.length > MAX_NAME_LENGTH) {
    throw new TidingsError(
      'INVALID_CONTRACT',
      `${kind} name ${JSON.stringify(name)} is invalid: use lower-case letters and digits in words joined by ".", "-" or "_", at most ${MAX_NAME_LENGTH} characters (for example "orders.order-placed")`,
    );
  }
  return name;
}

function define<const Name extends string, S extends StandardSchemaV1>(
  kind: 'event' | 'command',
  name: Name,
  options: ContractOptions<S> & { reply?: StandardSchemaV1 },
): Contract<Name, StandardSchemaV1.InferInput<S>, StandardSchemaV1.InferOutput<S>> {
  validateName(kind === 'event' ? 'Event' : 'Command', name);
  const version = options.version ?? 1;
  if (!Number.isInteger(version) || version < 1) {
    throw new TidingsError('INVALID_CONTRACT', `Contract ${name}: version must be a positive integer, got ${version}`);
  }
  const schema = options.schema as StandardSchemaV1 | undefined;
  if (schema === undefined || typeof schema['~standard']?.validate !== 'function') {
    throw new TidingsError('INVALID_CONTRACT', `Contract ${name}: schema must be a Standard Schema (zod 4, valibot, arktype...), got ${typeof schema}`);
  }
  const upcast = checkUpcasters(name, version, options.upcast);
  if (options.toJSONSchema !== undefined && typeof options.toJSONSchema !== 'function') {
    throw new TidingsError('INVALID_CONTRACT', `Contract ${name}: toJSONSchema must be a function returning the schema as JSON Schema`);
  }
  return Object.freeze({
    kind,
    name,
    version,
    type: `${name}.v${version}`,
    topic: name,
    schema: options.schema,
    key: options.key,
    description: options.description,
    reply: options.reply,
    upcast,
    toJSONSchema: options.toJSONSchema,
    requireTenant: options.requireTenant === true,
  });
}

/** Upcasters keyed by versions below `version`, each a function; frozen so a contract stays what it was declared. */
function checkUpcasters(name: string, version: number, upcast: Record<number, unknown> | undefined): Readonly<Record<number, Upcaster<unknown>>> | undefined {
  if (upcast === undefined) return undefined;
  if (upcast === null || typeof upcast !== 'object') {
    throw new TidingsError('INVALID_CONTRACT', `Contract ${name}: upcast must be an object of older versions, for example { 1: (v1) => v${version}Data }`);
  }
  for (const [key, upcaster] of Object.entries(upcast)) {
    const from = Number(key);
    if (!Number.isInteger(from) || from < 1 || from >= version) {
      throw new TidingsError(
        'INVALID_CONTRACT',
        `Contract ${name} version ${version}: upcast.${key} must name an older version (an integer from 1 to ${version - 1})`,
      );
    }
    if (typeof upcaster !== 'function') {
      throw new TidingsError(
        'INVALID_CONTRACT',
        `Contract ${name} version ${version}: upcast.${key} must be a function from version ${key}'s data to version ${version}'s`,
      );
    }
  }
  return Object.freeze({ ...upcast }) as Readonly<Record<number, Upcaster<unknown>>>;
}

/**
 * The data of a message of `version` as `contract`'s version reads it: as it is for the contract's own
 * version (or an older one with no upcaster), else through the upcaster. Throws UNDECODABLE_MESSAGE naming
 * the versions when the upcaster fails: retrying cannot change stored data.
 */
export function upcastData(contract: AnyContract, version: number | undefined, data: unknown, ref?: MessageRef): unknown {
  if (version === undefined || version >= contract.version) return data;
  const upcaster = contract.upcast?.[version];
  if (upcaster === undefined) return data;
  try {
    return upcaster(data);
  } catch (cause) {
    const why = cause instanceof Error ? cause.message : String(cause);
    throw new TidingsError(
      'UNDECODABLE_MESSAGE',
      `Upcasting version ${version} of ${contract.name} to version ${contract.version} failed: ${why}; fix the upcaster, then redrive`,
      { cause, ref },
    );
  }
}

/** Declares an event: a fact that every subscription of its topic receives. */
export function defineEvent<const Name extends string, S extends StandardSchemaV1>(name: Name, options: ContractOptions<S>) {
  return define('event', name, options);
}

/** Declares a command: a request for one service to act, handled by one subscription. */
/** Declares a command that answers: `bus.request(command, data)` resolves to its handler's reply. */
export function defineCommand<const Name extends string, S extends StandardSchemaV1, R extends StandardSchemaV1>(
  name: Name,
  options: ContractOptions<S> & { reply: R },
): RequestContract<Name, StandardSchemaV1.InferInput<S>, StandardSchemaV1.InferOutput<S>, StandardSchemaV1.InferInput<R>, StandardSchemaV1.InferOutput<R>>;
export function defineCommand<const Name extends string, S extends StandardSchemaV1>(
  name: Name,
  options: ContractOptions<S>,
): Contract<Name, StandardSchemaV1.InferInput<S>, StandardSchemaV1.InferOutput<S>>;
export function defineCommand(name: string, options: ContractOptions<StandardSchemaV1> & { reply?: StandardSchemaV1 }): AnyContract {
  if (options.reply !== undefined && typeof options.reply['~standard']?.validate !== 'function') {
    throw new TidingsError('INVALID_CONTRACT', `Contract ${name}: reply must be a Standard Schema (zod 4, valibot, arktype...), got ${typeof options.reply}`);
  }
  return define('command', name, options);
}

/** Validates `value` against the contract's schema; throws a ValidationError naming every bad field. */
export async function validate<C extends AnyContract>(contract: C, value: unknown, ref?: MessageRef): Promise<DataOf<C>> {
  return validateNow(contract, value, ref);
}

/** `validate`, but synchronous when the schema is (most are): a large publishMany then pays no promise per message. */
export function validateNow<C extends AnyContract>(contract: C, value: unknown, ref?: MessageRef): DataOf<C> | Promise<DataOf<C>> {
  const result = contract.schema['~standard'].validate(value);
  return result instanceof Promise ? result.then((settled) => outcome(contract, settled, ref)) : outcome(contract, result, ref);
}

function outcome<C extends AnyContract>(contract: C, result: StandardSchemaV1.Result<unknown>, ref: MessageRef | undefined, what = contract.name): DataOf<C> {
  if (result.issues) throw new ValidationError(what, result.issues.map(toIssue), ref);
  return result.value as DataOf<C>;
}

/** Validates a request's reply against its contract's `reply` schema; synchronous when the schema is. */
export function validateReplyNow<C extends AnyContract>(contract: C, value: unknown, ref?: MessageRef): unknown {
  const schema = contract.reply;
  if (schema === undefined) throw new TidingsError('INVALID_CONTRACT', `${contract.name} declares no reply: give defineCommand a reply schema`);
  const what = `the reply of ${contract.name}`;
  const result = schema['~standard'].validate(value);
  return result instanceof Promise ? result.then((settled) => outcome(contract, settled, ref, what)) : outcome(contract, result, ref, what);
}

function toIssue(issue: StandardSchemaV1.Issue): ValidationIssue {
  const path = (issue.path ?? [])
    .map((segment) => (typeof segment === 'object' ? segment.key : segment))
    .map((key) => String(key))
    .join('.');
  return { path, message: issue.message };
}
