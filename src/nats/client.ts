import type * as Jetstream from '@nats-io/jetstream';
import type * as Kv from '@nats-io/kv';
import type * as Transport from '@nats-io/transport-node';
import { loadPackage } from '../core/packages.ts';

/**
 * nats.js, loaded when a NATS backbone opens instead of imported at the top of these modules: without it,
 * importing tidings/nats would fail with Node's bare "Cannot find package"; now opening names the missing
 * package and its install command (PACKAGE_UNAVAILABLE, core/packages.ts; tarball.smoke.test.ts).
 * Everything that uses the client runs after the backbone opened.
 */
export interface NatsClient {
  readonly transport: typeof Transport;
  readonly jetstream: typeof Jetstream;
  readonly kv: typeof Kv;
}

let loaded: NatsClient | undefined;

export async function loadClient(): Promise<NatsClient> {
  const needs = 'The NATS backbone';
  const all = '@nats-io/transport-node @nats-io/jetstream @nats-io/kv';
  loaded ??= {
    transport: await loadPackage(import('@nats-io/transport-node'), '@nats-io/transport-node', needs, all),
    jetstream: await loadPackage(import('@nats-io/jetstream'), '@nats-io/jetstream', needs, all),
    kv: await loadPackage(import('@nats-io/kv'), '@nats-io/kv', needs, all),
  };
  return loaded;
}

/** The client loadClient() loaded. */
export function client(): NatsClient {
  if (loaded === undefined) throw new Error('nats.js is used before the NATS backbone opened');
  return loaded;
}
