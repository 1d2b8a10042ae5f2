/**
 * Operating a Tidings schema from outside its buses, as `tidings/postgres` exports it: status, dead letters,
 * replay, tail, dropping a subscription, sagas. Plain functions over a driver and a schema name, so the
 * `tidings` CLI, tests and a web console share them. None of them exits the process or prints: they return
 * data or throw a TidingsError.
 */
export { adminDefaults } from './options.ts';
export {
  readStatus,
  type PartitionStatus,
  type Status,
  type StatusOptions,
  type SubscriptionStatus,
  type TopicDisagreement,
  type WorkerStatus,
} from './status.ts';
export {
  countDeadLetters,
  deadLetterStore,
  dropDeadLetters,
  groupDeadLetters,
  listDeadLetters,
  PostgresDeadLetters,
  redriveDeadLetters,
  showDeadLetter,
  type DeadLetter,
  type DeadLetterActionOptions,
  type DeadLetterActionResult,
  type DeadLetterGroup,
  type DeadLetterProgress,
  type DeadLetterSelection,
  type DeadLetterSummary,
  type ListDeadLettersOptions,
  type RedriveOptions,
  type ShowDeadLetterOptions,
} from '../dead-letters.ts';
export { defaultActor } from './chunks.ts';
export { firstPositionAt, replaySubscription, type PositionAtOptions, type ReplayOptions, type ReplayResult } from './replay.ts';
export { tailTopic, type TailedMessage, type TailOptions } from './tail.ts';
export { dropSubscription, type DropSubscriptionResult } from './subscriptions.ts';
export { listSagas, showSaga, type ListSagasOptions, type SagaDetail, type SagaSummary, type SagaTransition } from './sagas.ts';
// For tools that run their own queries on a Tidings schema: its quoted name, the missing-schema error, ISO times.
export { explainMissingSchema } from './schema.ts';
export { schemaOf } from '../sql/schema.ts';
export { iso } from '../codec.ts';
