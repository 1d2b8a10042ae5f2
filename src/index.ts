export { createBus, Bus } from './core/bus.ts';
export type { BusStats } from './core/bus.ts';
export type { BusOptions } from './core/bus-options.ts';
export type { PublishOptions, PublishedMessage } from './core/publish.ts';
export { Subscription } from './core/subscription.ts';
export type { SubscriptionStats } from './core/subscription.ts';
export { defineEvent, defineCommand, validate } from './core/contract.ts';
export type {
  Contract,
  AnyContract,
  AnyRequestContract,
  ContractOptions,
  DataOf,
  InputOf,
  ReplyInputOf,
  ReplyOf,
  RequestContract,
  Upcaster,
} from './core/contract.ts';
export type { StandardSchemaV1 } from './core/standard-schema.ts';
export { newId, keyHash, partitionOf } from './core/envelope.ts';
export type { Envelope, Message } from './core/envelope.ts';
export { TidingsError, ValidationError, PermanentError, HandlerTimeoutError, TenantRateLimitedError, describeError } from './core/errors.ts';
export type { TidingsErrorCode, ValidationIssue, ErrorRecord, MessageRef } from './core/errors.ts';
export { retryLater, deadLetter } from './core/handler.ts';
export { nextRetryDelay } from './core/retry.ts';
export { scheduleDefaults } from './core/schedules.ts';
export { defineSaga, sagaDefaults } from './core/saga.ts';
export type { SagaContext, SagaDefinition, SagaStats, SagaStore, SagaRow, Transition } from './core/saga.ts';
export type { ScheduleOptions } from './core/schedules.ts';
export type { Handler, HandlerContext, Middleware, Outcome } from './core/handler.ts';
export { subscriptionDefaults, busDefaults, quotaDefaults, resolveSubscribeOptions } from './core/options.ts';
export type { SubscribeOptions, RetryOptions, QuotaOptions, TenantRate } from './core/options.ts';
export type {
  Backbone,
  Consumer,
  Outgoing,
  SubscriptionSpec,
  Delivery,
  DeliveryHandler,
  DeliveryResult,
  AttemptRecord,
} from './core/backbone.ts';
export { EVERY_TOPIC } from './core/backbone.ts';
export { groupDeadLetters } from './core/dead-letters.ts';
export type { Broker } from './core/broker.ts';
export type {
  DeadLetter,
  DeadLetterActionRequest,
  DeadLetterActionResult,
  DeadLetterGroup,
  DeadLetterProgress,
  DeadLetterSelection,
  DeadLetterStore,
  DeadLetterSummary,
} from './core/dead-letters.ts';
export { brokered, BrokerBackbone, relayDefaults } from './outbox/index.ts';
export type { BrokeredOptions, RelayOptions } from './outbox/index.ts';
export { healthFetch, healthHandler, healthPaths } from './telemetry/http.ts';
export type { HealthPaths } from './telemetry/http.ts';
export { healthDefaults } from './telemetry/health.ts';
export type { BusHealth, HealthOptions } from './telemetry/health.ts';
export type { BackboneStatus, HealthCheck, PartitionState, SubscriptionState } from './telemetry/status.ts';
export type { BusEvents, BusEventName, BusEventListener, MessageEvent } from './telemetry/events.ts';
export type { Logger } from './telemetry/logger.ts';
export { telemetryDefaults } from './telemetry/options.ts';
export type { TelemetryOptions, TracerProviderLike, MeterProviderLike } from './telemetry/options.ts';
export type { BackboneObserver, BackboneEventName, HopSpan, TraceHeaders } from './telemetry/observer.ts';
