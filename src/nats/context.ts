import type { NatsConnection } from '@nats-io/transport-node';
import type { NatsSettings } from './options.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import type { Topology } from './topology.ts';

/** What consumers and the dead-letter store share with the broker once it is open: the connection, the streams and KV buckets, the settings. */
export interface NatsContext extends Topology {
  readonly nc: NatsConnection;
  readonly settings: NatsSettings;
  readonly warn: (message: string, error?: unknown) => void;
  /** The bus's telemetry, once it handed it over (Backbone.observe): told of lost leases. */
  readonly observer?: () => BackboneObserver | undefined;
}
