/**
 * What a backbone may report about itself, for the observable gauges (metrics.ts) and `bus.health()`: the
 * optional `Backbone.status()` and `Backbone.health()`. A backbone without them simply has no such gauges,
 * and its readiness is judged by the bus alone.
 */

export interface PartitionState {
  readonly partition: number;
  /** Messages committed to the partition and not yet handled by the subscription. */
  readonly lag: number;
  /** Age of the oldest of them, by publication time; null when there is none; undefined when the backbone cannot tell. */
  readonly oldestUnhandledAgeMs: number | null | undefined;
}

export interface SubscriptionState {
  readonly name: string;
  readonly lag: number;
  /** As a partition's: null when there is none, undefined when the backbone cannot tell. */
  readonly oldestUnhandledAgeMs: number | null | undefined;
  /** Keys waiting for a delayed retry (or a redrive). */
  readonly heldKeys: number;
  readonly deadLetters: number;
  readonly partitions: readonly PartitionState[];
}

export interface BackboneStatus {
  readonly subscriptions: readonly SubscriptionState[];
  /** A broker backbone's outbox: messages committed and not yet handed to the broker by the relay. */
  readonly relay?: { readonly backlog: number; readonly oldestAgeMs: number | null } | undefined;
}

/** One thing readiness depends on, as a backbone checked it. */
export interface HealthCheck {
  /** What was checked: `database`, `notifier`, `broker`, `relay`… */
  readonly name: string;
  readonly ok: boolean;
  /** What was found (`listening`, `polling`, `connected`), or why it is not ok. */
  readonly detail: string;
}
