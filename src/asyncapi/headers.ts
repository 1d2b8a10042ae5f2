/**
 * The CloudEvents 1.0 attributes every Tidings message carries (core/envelope.ts), as the JSON Schema of an
 * AsyncAPI message's headers: columns of the log on PostgreSQL, message headers on RabbitMQ and NATS.
 */
import type { ContractRecord, JsonSchema } from '../core/catalog.ts';

const REQUIRED = ['specversion', 'id', 'source', 'type', 'time', 'datacontenttype', 'topic', 'partitionkey', 'correlationid'];

export function messageHeaders(contract: ContractRecord): JsonSchema {
  const key =
    contract.key === 'id'
      ? 'The partition key: the message id (the contract has no key function), unless the publisher gives one'
      : contract.key === 'function'
        ? "The partition key, computed from the data by the contract's key function: equal keys are handled in order"
        : `The partition key: the data's ${contract.key}. Messages with equal keys are handled in order, one at a time`;
  return {
    type: 'object',
    required: REQUIRED,
    properties: {
      specversion: { type: 'string', const: '1.0', description: 'CloudEvents specification version' },
      id: { type: 'string', description: 'Unique message id (a UUID v7 when Tidings makes it); handlers with an inbox handle an id once' },
      source: { type: 'string', format: 'uri-reference', description: 'The publishing service: tidings://<service>' },
      type: { type: 'string', const: contract.type, description: 'The contract and its version: <name>.v<version>' },
      time: { type: 'string', format: 'date-time', description: 'When the message was published' },
      subject: { type: 'string', description: 'CloudEvents subject, if the publisher gave one' },
      datacontenttype: { type: 'string', const: 'application/json' },
      topic: { type: 'string', const: contract.topic, description: 'Extension: the topic the message is routed by' },
      partitionkey: { type: 'string', description: `Extension. ${key}` },
      tenant: { type: 'string', description: 'Extension: the tenant the message belongs to' },
      correlationid: { type: 'string', description: 'Extension: shared by a message and everything published while handling it' },
      causationid: { type: 'string', description: 'Extension: the id of the message whose handler published this one' },
      traceparent: { type: 'string', description: 'W3C trace context' },
      tracestate: { type: 'string', description: 'W3C trace context' },
    },
  };
}
