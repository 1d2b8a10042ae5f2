/**
 * An AsyncAPI 3.0 document from service records (core/catalog.ts): one channel per topic with a message per
 * contract version, a `send` operation per contract a service publishes, a `receive` operation per contract
 * a subscription handles. Messages carry their JSON Schema payload and the CloudEvents attributes as headers;
 * `x-tidings-*` extensions say what AsyncAPI has no field for (partitions, retry policy, dead letters, key,
 * upcasters). The same records come from the code (`bus.asyncapi()`) or from the registry (`tidings asyncapi
 * --system`), so the two documents are comparable. test/asyncapi.unit.test.ts parses each with @asyncapi/parser.
 */
import type { ContractRecord, JsonSchema, ServiceRecord, SubscriptionRecord } from '../core/catalog.ts';
import { messageHeaders } from './headers.ts';
import { canonical } from './json.ts';

export interface AsyncApiOptions {
  /** `info.title`: the service's name for one service, else "Tidings system". */
  title?: string;
  /** `info.version`: the version of the API described (default 1.0.0). */
  version?: string;
  description?: string;
  /** Hears of schemas that could not be converted and of versions published with two different schemas. */
  onWarning?: (message: string) => void;
}

/** The document as plain JSON (write it with JSON.stringify). */
export interface AsyncApiDocument {
  readonly asyncapi: '3.0.0';
  readonly info: { readonly title: string; readonly version: string; readonly description?: string };
  readonly defaultContentType: 'application/json';
  readonly channels: Record<string, Channel>;
  readonly operations: Record<string, Operation>;
  readonly [extension: `x-${string}`]: unknown;
}

export interface Channel {
  readonly address: string | null;
  readonly title?: string;
  readonly description?: string;
  readonly messages: Record<string, Message>;
  readonly bindings?: Record<string, unknown>;
  readonly [extension: `x-${string}`]: unknown;
}

export interface Message {
  readonly name: string;
  readonly title: string;
  readonly summary?: string;
  readonly contentType: 'application/json';
  readonly headers?: JsonSchema;
  readonly payload: JsonSchema;
  readonly correlationId?: { readonly location: string; readonly description: string };
  readonly bindings?: Record<string, unknown>;
  readonly [extension: `x-${string}`]: unknown;
}

export interface Reference {
  readonly $ref: string;
}

export interface Operation {
  readonly action: 'send' | 'receive';
  readonly channel: Reference;
  readonly title: string;
  readonly messages: readonly Reference[];
  readonly reply?: { readonly channel: Reference; readonly messages: readonly Reference[] };
  readonly bindings?: Record<string, unknown>;
  readonly [extension: `x-${string}`]: unknown;
}

export const ASYNCAPI_VERSION = '3.0.0';
const AMQP_BINDING = '0.3.0';
const NATS_BINDING = '0.1.0';

/** The document describing `services` (one for a service's document, all of the registry's for the system's). */
export function asyncapiDocument(services: readonly ServiceRecord[], options: AsyncApiOptions = {}): AsyncApiDocument {
  const warn = options.onWarning ?? (() => undefined);
  const sorted = [...services].sort((a, b) => a.service.localeCompare(b.service));
  const channels: Record<string, Channel & { messages: Record<string, Message>; description?: string }> = {};
  const describedBy = new Map<string, number>();
  const operations: Record<string, Operation> = {};
  /** The first record of each type, and who gave it: a second with another schema is a conflict to report. */
  const firstOf = new Map<string, { readonly record: ContractRecord; readonly service: string }>();

  const channelOf = (service: ServiceRecord, contract: ContractRecord): string => {
    const previous = firstOf.get(contract.type);
    if (previous !== undefined) {
      if (canonical(previous.record.schema) !== canonical(contract.schema)) {
        warn(
          `${contract.type} has two schemas: ${previous.service}'s and ${service.service}'s differ (version ${contract.version} reused with a different schema); documented with ${previous.service}'s. Give the changed contract version ${contract.version + 1}`,
        );
      }
      return contract.topic;
    }
    firstOf.set(contract.type, { record: contract, service: service.service });
    const channel = (channels[contract.topic] ??= {
      address: addressOf(service, contract.topic),
      title: contract.topic,
      messages: {},
      ...channelBindings(service, contract.topic),
    });
    channel.messages[contract.type] = messageOf(service, contract);
    // The channel says what its newest described version says, whichever service was read first.
    if (contract.description !== undefined && contract.version >= (describedBy.get(contract.topic) ?? 0)) {
      describedBy.set(contract.topic, contract.version);
      channel.description = contract.description;
    }
    if (contract.reply !== undefined) {
      const replies = (channels[replyChannel(contract.topic)] ??= {
        // A reply goes back to the one who asked: no fixed address.
        address: null,
        title: `Replies to ${contract.topic}`,
        messages: {},
      });
      replies.messages[replyMessage(contract.type)] = {
        name: replyMessage(contract.type),
        title: `The reply to ${contract.name} v${contract.version}`,
        contentType: 'application/json',
        payload: contract.reply,
      };
    }
    return contract.topic;
  };

  for (const service of sorted) {
    for (const contract of service.publishes) {
      const topic = channelOf(service, contract);
      operations[`${service.service}.send.${topic}`] = {
        action: 'send',
        channel: { $ref: channelRef(topic) },
        title: `${service.service} ${contract.kind === 'command' ? 'sends' : 'publishes'} ${contract.name}`,
        messages: [{ $ref: messageRef(topic, contract.type) }],
        ...replyOf(contract),
        'x-tidings-service': service.service,
      };
    }
    for (const subscription of service.subscriptions) {
      for (const contract of subscription.contracts) {
        const topic = channelOf(service, contract);
        operations[`${service.service}.${subscription.name}.receive.${topic}`] = receiveOperation(service, subscription, contract, topic);
      }
    }
  }
  for (const service of sorted) {
    for (const contract of [...service.publishes, ...service.subscriptions.flatMap((subscription) => subscription.contracts)]) {
      if (contract.schemaProblem !== undefined) warn(`Service ${service.service}: ${contract.schemaProblem}`);
    }
  }

  const single = sorted.length === 1 ? sorted[0] : undefined;
  const description =
    options.description ??
    (single !== undefined
      ? `The messages service ${single.service} publishes and receives, generated by Tidings from its contracts.`
      : `The messages of ${sorted.length} services (${sorted.map((service) => service.service).join(', ')}), generated by Tidings from their registry.`);
  return {
    asyncapi: ASYNCAPI_VERSION,
    info: { title: options.title ?? single?.service ?? 'Tidings system', version: options.version ?? '1.0.0', description },
    defaultContentType: 'application/json',
    channels: sortedRecord(channels),
    operations: sortedRecord(operations),
    'x-tidings-services': sorted.map((service) => ({ service: service.service, backbone: service.backbone.name })),
  };
}

function receiveOperation(service: ServiceRecord, subscription: SubscriptionRecord, contract: ContractRecord, topic: string): Operation {
  const { retry } = subscription;
  return {
    action: 'receive',
    channel: { $ref: channelRef(topic) },
    title: `${service.service} handles ${contract.name} in subscription ${subscription.name}`,
    messages: [{ $ref: messageRef(topic, contract.type) }],
    ...replyOf(contract),
    ...operationBindings(service, subscription),
    'x-tidings-service': service.service,
    'x-tidings-subscription': subscription.name,
    'x-tidings-partitions': subscription.partitions,
    'x-tidings-concurrency': subscription.concurrency,
    'x-tidings-timeout-ms': subscription.timeoutMs,
    'x-tidings-inbox': subscription.inbox,
    'x-tidings-retry': { immediate: retry.immediate, delayedMs: [...retry.delayed], jitter: retry.jitter },
    'x-tidings-dead-letters': {
      afterAttempts: 1 + retry.immediate + retry.delayed.length,
      where: deadLettersOf(service, subscription.name),
    },
  };
}

function messageOf(service: ServiceRecord, contract: ContractRecord): Message {
  const bindings = service.backbone.name === 'rabbitmq' ? { bindings: { amqp: { messageType: contract.type, bindingVersion: AMQP_BINDING } } } : {};
  return {
    name: contract.type,
    title: `${contract.name} v${contract.version}`,
    ...(contract.description === undefined ? {} : { summary: contract.description }),
    contentType: 'application/json',
    headers: messageHeaders(contract),
    payload: contract.schema,
    correlationId: { location: '$message.header#/correlationid', description: 'Shared by a message and every message published while handling it' },
    ...bindings,
    'x-tidings-kind': contract.kind,
    'x-tidings-version': contract.version,
    'x-tidings-key': contract.key,
    ...(contract.upcasts.length === 0 ? {} : { 'x-tidings-upcasts': [...contract.upcasts] }),
  };
}

function replyOf(contract: ContractRecord): Pick<Operation, 'reply'> {
  if (contract.reply === undefined) return {};
  const channel = replyChannel(contract.topic);
  return { reply: { channel: { $ref: channelRef(channel) }, messages: [{ $ref: messageRef(channel, replyMessage(contract.type)) }] } };
}

/** Where the topic's messages travel on the service's backbone: the exchange, the subject pattern, or the topic. */
function addressOf(service: ServiceRecord, topic: string): string {
  const settings = service.backbone.settings ?? {};
  if (service.backbone.name === 'rabbitmq') return `${String(settings.prefix ?? '')}${topic}`;
  if (service.backbone.name === 'nats') return `${String(settings.subjectPrefix ?? 'tidings')}.*.${topic}`;
  return topic;
}

function channelBindings(service: ServiceRecord, topic: string): Pick<Channel, 'bindings'> {
  if (service.backbone.name !== 'rabbitmq') return {};
  return {
    bindings: {
      amqp: {
        is: 'routingKey',
        exchange: { name: addressOf(service, topic), type: 'topic', durable: true, autoDelete: false, vhost: '/' },
        bindingVersion: AMQP_BINDING,
      },
    },
  };
}

function operationBindings(service: ServiceRecord, subscription: SubscriptionRecord): Pick<Operation, 'bindings'> {
  if (service.backbone.name === 'rabbitmq') return { bindings: { amqp: { ack: true, bindingVersion: AMQP_BINDING } } };
  // A subscription's workers share its messages, as a NATS queue group's members do.
  if (service.backbone.name === 'nats') return { bindings: { nats: { queue: subscription.name, bindingVersion: NATS_BINDING } } };
  return {};
}

function deadLettersOf(service: ServiceRecord, subscription: string): string {
  const settings = service.backbone.settings ?? {};
  if (service.backbone.name === 'rabbitmq') return `queue ${String(settings.prefix ?? '')}${subscription}:dead`;
  if (service.backbone.name === 'nats') return `stream ${String(settings.stream ?? 'TIDINGS')}_DLQ`;
  if (service.backbone.name === 'postgres') return `table ${String(settings.schema ?? 'tidings')}.dead_letters`;
  return `${service.backbone.name} dead letters`;
}

const replyChannel = (topic: string) => `${topic}.reply`;
const replyMessage = (type: string) => `${type}.reply`;
const channelRef = (channel: string) => `#/channels/${channel}`;
const messageRef = (channel: string, message: string) => `#/channels/${channel}/messages/${message}`;

function sortedRecord<T>(record: Record<string, T>): Record<string, T> {
  return Object.fromEntries(Object.entries(record).sort(([a], [b]) => a.localeCompare(b)));
}
