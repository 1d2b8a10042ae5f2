/**
 * Breaking changes between the contracts a system runs (a committed AsyncAPI document, or the registry's)
 * and the code about to be deployed: a required field added, a field removed or retyped, an enum narrowed,
 * a version reused with a different schema, a version bump consumers cannot read yet. Each finding names
 * the contract, the field and the consumers affected. `tidings contracts check` prints them.
 */
import type { ContractRecord, JsonSchema, ServiceRecord } from '../core/catalog.ts';
import type { AsyncApiDocument } from './document.ts';
import { canonical } from './json.ts';

/** One contract version as either side knows it. */
interface Known {
  readonly type: string;
  readonly topic: string;
  readonly version: number;
  readonly schema: JsonSchema;
  readonly upcasts: readonly number[];
}

interface Consumer {
  readonly service: string;
  readonly subscription: string;
  readonly topic: string;
  readonly version: number;
}

/** What one side (the deployed system, or the code) holds: contract versions and who consumes them. */
export interface ContractSet {
  readonly contracts: readonly Known[];
  readonly consumers: readonly Consumer[];
}

export interface Finding {
  /** Breaking findings make `tidings contracts check` exit 1; the others are printed for information. */
  readonly breaking: boolean;
  /** `<topic> v<version>` (or two versions, `v1 -> v2`). */
  readonly contract: string;
  /** The field's path in the data (`price.amount`, `items[]`); undefined when the change is not a field's. */
  readonly field?: string | undefined;
  readonly change: string;
  /** `service/subscription` of every consumer the change reaches. */
  readonly consumers: readonly string[];
}

/** The contracts and consumers a document describes (its messages' x-tidings-version and its receive operations). */
export function contractsOfDocument(document: AsyncApiDocument): ContractSet {
  const contracts: Known[] = [];
  for (const channel of Object.values(document.channels ?? {})) {
    for (const message of Object.values(channel.messages ?? {})) {
      const version = message['x-tidings-version'];
      if (typeof version !== 'number') continue; // a reply, or a message Tidings did not write
      const upcasts = message['x-tidings-upcasts'];
      contracts.push({
        type: message.name,
        topic: topicOf(message.name, version),
        version,
        schema: message.payload ?? {},
        upcasts: Array.isArray(upcasts) ? (upcasts as number[]) : [],
      });
    }
  }
  const consumers: Consumer[] = [];
  for (const operation of Object.values(document.operations ?? {})) {
    if (operation.action !== 'receive') continue;
    const service = operation['x-tidings-service'];
    const subscription = operation['x-tidings-subscription'];
    const type = operation.messages?.[0]?.$ref.split('/').at(-1);
    const known = contracts.find((contract) => contract.type === type);
    if (typeof service !== 'string' || typeof subscription !== 'string' || known === undefined) continue;
    consumers.push({ service, subscription, topic: known.topic, version: known.version });
  }
  return { contracts, consumers };
}

/** The code's side: every contract it declares, and its buses' subscriptions. */
export function contractsOfCode(contracts: readonly ContractRecord[], services: readonly ServiceRecord[]): ContractSet {
  return {
    contracts: contracts.map((contract) => ({
      type: contract.type,
      topic: contract.topic,
      version: contract.version,
      schema: contract.schema,
      upcasts: contract.upcasts,
    })),
    consumers: services.flatMap((service) =>
      service.subscriptions.flatMap((subscription) =>
        subscription.contracts.map((contract) => ({
          service: service.service,
          subscription: subscription.name,
          topic: contract.topic,
          version: contract.version,
        })),
      ),
    ),
  };
}

export interface CompatibilityOptions {
  /**
   * A version is immutable: any change to its schema breaks, even one only adding optional fields (which
   * messages of either schema pass, so by default it is reported but does not break).
   */
  readonly strictVersions?: boolean;
}

/** What changes from `deployed` to `code`, breaking first. */
export function compatibility(deployed: ContractSet, code: ContractSet, options: CompatibilityOptions = {}): Finding[] {
  const findings: Finding[] = [];
  const topics = new Set(code.contracts.map((contract) => contract.topic));
  for (const topic of [...topics].sort()) {
    const before = versionsOf(deployed, topic);
    const after = versionsOf(code, topic);
    if (before.size === 0) continue; // a new contract breaks no one
    const consumersAt = (version?: number) =>
      [...deployed.consumers, ...code.consumers]
        .filter((consumer) => consumer.topic === topic && (version === undefined || consumer.version === version))
        .map((consumer) => `${consumer.service}/${consumer.subscription}`)
        .filter((name, index, all) => all.indexOf(name) === index)
        .sort();
    // The same version with another schema: every consumer of it reads data it was not written for.
    for (const [version, now] of after) {
      const was = before.get(version);
      if (was === undefined || canonical(withoutNotes(was.schema)) === canonical(withoutNotes(now.schema))) continue;
      const consumers = consumersAt(version);
      const changes = schemaChanges(was.schema, now.schema);
      const additive = changes.every((change) => !change.breaking);
      findings.push(
        additive && !options.strictVersions
          ? {
              breaking: false,
              contract: `${topic} v${version}`,
              change: `version ${version} changed compatibly: messages of either schema pass the other`,
              consumers,
            }
          : {
              breaking: true,
              contract: `${topic} v${version}`,
              change: `version ${version} reused with a different schema: give the new schema version ${Math.max(...before.keys(), ...after.keys()) + 1}, with an upcaster from ${version}`,
              consumers,
            },
      );
      for (const change of changes) findings.push({ ...change, contract: `${topic} v${version}`, consumers });
    }
    const oldTop = Math.max(...before.keys());
    const newTop = Math.max(...after.keys());
    if (newTop > oldTop) {
      const now = after.get(newTop)!;
      const was = before.get(oldTop)!;
      const name = `${topic} v${oldTop} -> v${newTop}`;
      if (now.upcasts.includes(oldTop)) {
        findings.push({
          breaking: false,
          contract: name,
          change: `version ${newTop} reads version ${oldTop} through its upcaster`,
          consumers: consumersAt(newTop),
        });
      } else {
        for (const change of schemaChanges(was.schema, now.schema)) {
          findings.push({
            ...change,
            contract: name,
            change: `${change.change} (no upcaster for version ${oldTop}: its messages are read as they are)`,
            consumers: consumersAt(),
          });
        }
      }
      // Consumers still on an older version dead-letter the new one ("no handler for version N").
      const upgraded = new Set(code.consumers.filter((consumer) => consumer.topic === topic && consumer.version >= newTop).map(consumerName));
      const behind = deployed.consumers.filter((consumer) => consumer.topic === topic && consumer.version < newTop && !upgraded.has(consumerName(consumer)));
      if (behind.length > 0) {
        findings.push({
          breaking: true,
          contract: name,
          change: `consumers on an older version dead-letter version ${newTop} messages (no handler for version ${newTop}): deploy them with version ${newTop} before anything publishes it`,
          consumers: behind.map(consumerName).sort(),
        });
      }
    } else if (newTop < oldTop) {
      const readers = code.consumers.filter((consumer) => consumer.topic === topic && consumer.version < oldTop);
      if (readers.length > 0) {
        findings.push({
          breaking: true,
          contract: `${topic} v${newTop}`,
          change: `the code reads version ${newTop}, but version ${oldTop} is deployed: these subscriptions dead-letter version ${oldTop} messages; update the contract to version ${oldTop}`,
          consumers: readers.map(consumerName).sort(),
        });
      }
    }
  }
  return [...findings.filter((finding) => finding.breaking), ...findings.filter((finding) => !finding.breaking)];
}

/** One line per finding: `BREAKING orders.order-placed v1, field amountCents: retyped from integer to string (consumers: billing/charge)`. */
export function renderFindings(findings: readonly Finding[]): string {
  return findings
    .map((finding) => {
      const field = finding.field === undefined ? '' : `, field ${finding.field}`;
      const consumers = finding.consumers.length === 0 ? 'no known consumers' : `consumers: ${finding.consumers.join(', ')}`;
      return `${finding.breaking ? 'BREAKING' : 'ok      '} ${finding.contract}${field}: ${finding.change} (${consumers})`;
    })
    .join('\n');
}

type Change = Pick<Finding, 'breaking' | 'field' | 'change'>;

/** What changed between two JSON Schemas of a payload, field by field, as a reader of old data sees it. */
export function schemaChanges(was: JsonSchema, now: JsonSchema, path = ''): Change[] {
  if (canonical(withoutNotes(was)) === canonical(withoutNotes(now))) return [];
  const field = path === '' ? undefined : path;
  const opaque = ['anyOf', 'oneOf', 'allOf', '$ref', 'not'];
  if (opaque.some((keyword) => keyword in was || keyword in now)) {
    return [{ breaking: true, field, change: 'changed in a way this check does not compare field by field (anyOf, oneOf, allOf or $ref); review it' }];
  }
  const changes: Change[] = [];
  const typesWas = typesOf(was);
  const typesNow = typesOf(now);
  if (typesWas.length > 0 && typesNow.length > 0 && canonical(typesWas) !== canonical(typesNow)) {
    const covered = typesWas.every((type) => typesNow.includes(type) || (type === 'integer' && typesNow.includes('number')));
    changes.push({
      breaking: !covered,
      field,
      change: covered ? `widened from ${typesWas.join(' | ')} to ${typesNow.join(' | ')}` : `retyped from ${typesWas.join(' | ')} to ${typesNow.join(' | ')}`,
    });
    if (!covered) return changes;
  }
  const enumWas = enumOf(was);
  const enumNow = enumOf(now);
  if (enumWas !== undefined && enumNow !== undefined) {
    const removed = enumWas.filter((value) => !enumNow.some((other) => canonical(other) === canonical(value)));
    const added = enumNow.filter((value) => !enumWas.some((other) => canonical(other) === canonical(value)));
    if (removed.length > 0)
      changes.push({ breaking: true, field, change: `enum narrowed: ${removed.map((value) => JSON.stringify(value)).join(', ')} no longer allowed` });
    if (added.length > 0) changes.push({ breaking: false, field, change: `enum widened: ${added.map((value) => JSON.stringify(value)).join(', ')} added` });
  } else if (enumWas === undefined && enumNow !== undefined) {
    changes.push({ breaking: true, field, change: `now restricted to ${enumNow.map((value) => JSON.stringify(value)).join(', ')}` });
  }
  const propertiesWas = (was.properties ?? {}) as Record<string, JsonSchema>;
  const propertiesNow = (now.properties ?? {}) as Record<string, JsonSchema>;
  const requiredWas = new Set((was.required ?? []) as string[]);
  const requiredNow = new Set((now.required ?? []) as string[]);
  const at = (key: string) => (path === '' ? key : `${path}.${key}`);
  for (const key of Object.keys(propertiesWas)) {
    if (!(key in propertiesNow)) changes.push({ breaking: true, field: at(key), change: 'field removed' });
  }
  for (const [key, schema] of Object.entries(propertiesNow)) {
    const before = propertiesWas[key];
    if (before === undefined) {
      changes.push(
        requiredNow.has(key)
          ? { breaking: true, field: at(key), change: 'required field added: older messages do not have it' }
          : { breaking: false, field: at(key), change: 'optional field added' },
      );
      continue;
    }
    if (requiredNow.has(key) && !requiredWas.has(key))
      changes.push({ breaking: true, field: at(key), change: 'field became required: older messages may not have it' });
    changes.push(...schemaChanges(before, schema, at(key)));
  }
  if (isSchema(was.items) && isSchema(now.items)) changes.push(...schemaChanges(was.items, now.items, `${path}[]`));
  if (changes.length === 0) {
    // Constraints (lengths, patterns, bounds, formats): tighter ones may refuse older data.
    changes.push({ breaking: true, field, change: 'constraints changed (length, pattern, bounds or format); review whether older data still passes' });
  }
  return changes;
}

/** Keywords that describe and change nothing a validator checks. */
const NOTES = new Set(['description', 'title', 'examples', '$comment']);

function withoutNotes(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutNotes);
  if (value === null || typeof value !== 'object') return value;
  return Object.fromEntries(Object.entries(value).flatMap(([key, inner]) => (NOTES.has(key) ? [] : [[key, withoutNotes(inner)]])));
}

function versionsOf(set: ContractSet, topic: string): Map<number, Known> {
  return new Map(set.contracts.filter((contract) => contract.topic === topic).map((contract) => [contract.version, contract]));
}

function consumerName(consumer: Consumer): string {
  return `${consumer.service}/${consumer.subscription}`;
}

/** `orders.order-placed.v2` -> `orders.order-placed`. */
function topicOf(type: string, version: number): string {
  const suffix = `.v${version}`;
  return type.endsWith(suffix) ? type.slice(0, -suffix.length) : type;
}

function typesOf(schema: JsonSchema): string[] {
  const type = schema.type;
  return (Array.isArray(type) ? type : typeof type === 'string' ? [type] : []).map(String).sort();
}

function enumOf(schema: JsonSchema): unknown[] | undefined {
  if (Array.isArray(schema.enum)) return schema.enum;
  return 'const' in schema ? [schema.const] : undefined;
}

function isSchema(value: unknown): value is JsonSchema {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}
