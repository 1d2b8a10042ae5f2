import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';
import type { KV } from '@nats-io/kv';
import type { NatsConnection } from '@nats-io/transport-node';
import type { NatsSettings } from './options.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';

/** What consumers and the dead-letter store share with the broker once it is open. */
export interface NatsContext {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  /** Workers and bucket leases, entries expiring after leaseMs (see consume/leases.ts), and the KV bucket's name. */
  readonly leases: KV;
  readonly leasesBucket: string;
  /** Messages waiting for a delayed retry, kept until they are done (see holds.ts), and the KV bucket's name. */
  readonly holds: KV;
  readonly holdsBucket: string;
  readonly settings: NatsSettings;
  readonly dlqStream: string;
  readonly dlqPrefix: string;
  readonly warn: (message: string, error?: unknown) => void;
  /** The bus's telemetry, once it handed it over (Backbone.observe): told of lost leases. */
  readonly observer?: () => BackboneObserver | undefined;
}
