/**
 * The CloudEvents 1.0 attributes every Tidings message carries (core/envelope.ts), as AsyncAPI message
 * headers: columns of the log on PostgreSQL, message headers on RabbitMQ and NATS. They are the same for
 * every message, so they live once in a message trait (`#/components/messageTraits/cloudevents`), and each
 * message adds what is its own: its `type` and `topic`, and how its partition key is found.
 */
import type { ContractRecord, JsonSchema } from '../core/catalog.ts';

export const TRAIT = 'cloudevents';
export const TRAIT_REF = `#/components/messageTraits/${TRAIT}`;

/** The trait every message references: the headers and where the correlation id is. */
export function cloudEventsTrait(): Record<string, unknown> {
  return {
    headers: {
      type: 'object',
      required: ['specversion', 'id', 'source', 'type', 'time', 'datacontenttype', 'topic', 'partitionkey', 'correlationid'],
      properties: {
        specversion: { type: 'string', const: '1.0', description: 'CloudEvents specification version' },
        id: { type: 'string', description: 'Unique message id (a UUID v7 when Tidings makes it); handlers with an inbox handle an id once' },
        source: { type: 'string', format: 'uri-reference', description: 'The publishing service: tidings://<service>' },
        type: { type: 'string', description: 'The contract and its version: <name>.v<version>' },
        time: { type: 'string', format: 'date-time', description: 'When the message was published' },
        subject: { type: 'string', description: 'CloudEvents subject, if the publisher gave one' },
        datacontenttype: { type: 'string', const: 'application/json' },
        topic: { type: 'string', description: 'Extension: the topic the message is routed by' },
        partitionkey: { type: 'string', description: 'Extension: the partition key; messages with equal keys are handled in order, one at a time' },
        tenant: { type: 'string', description: 'Extension: the tenant the message belongs to' },
        correlationid: { type: 'string', description: 'Extension: shared by a message and everything published while handling it' },
        causationid: { type: 'string', description: 'Extension: the id of the message whose handler published this one' },
        traceparent: { type: 'string', description: 'W3C trace context' },
        tracestate: { type: 'string', description: 'W3C trace context' },
      },
    },
    correlationId: { location: '$message.header#/correlationid', description: 'Shared by a message and every message published while handling it' },
  };
}

/** What a message's headers add to the trait's (merged into them, the message's own words winning). */
export function messageHeaders(contract: ContractRecord): JsonSchema {
  const key =
    contract.key === 'id'
      ? 'The partition key: the message id (the contract has no key function), unless the publisher gives one'
      : contract.key === 'function'
        ? "The partition key, computed from the data by the contract's key function: equal keys are handled in order"
        : `The partition key: the data's ${contract.key}. Messages with equal keys are handled in order, one at a time`;
  return {
    type: 'object',
    properties: {
      type: { type: 'string', const: contract.type },
      topic: { type: 'string', const: contract.topic },
      partitionkey: { type: 'string', description: key },
    },
  };
}
