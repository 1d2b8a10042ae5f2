/**
 * The OpenTelemetry messaging semantic conventions' attribute names Tidings sets, in one place (the
 * `@opentelemetry/semantic-conventions` package holds them too, but is not worth a dependency for a dozen
 * strings), and the few of Tidings' own under `tidings.`.
 */
export const MESSAGING_SYSTEM = 'messaging.system';
export const OPERATION_TYPE = 'messaging.operation.type';
export const OPERATION_NAME = 'messaging.operation.name';
export const DESTINATION = 'messaging.destination.name';
export const PARTITION = 'messaging.destination.partition.id';
export const CONSUMER_GROUP = 'messaging.consumer.group.name';
export const SUBSCRIPTION = 'messaging.destination.subscription.name';
export const MESSAGE_ID = 'messaging.message.id';
export const CONVERSATION_ID = 'messaging.message.conversation_id';
export const BATCH_COUNT = 'messaging.batch.message_count';
export const ERROR_TYPE = 'error.type';
/** 1 for a message's first attempt. */
export const ATTEMPT = 'tidings.attempt';
/** ack, retry or dead-letter. */
export const OUTCOME = 'tidings.outcome';
