/**
 * The contracts registry of a NATS bus with no outbox database: a KV bucket `<stream>_services`, one key
 * per service holding its record (core/catalog.ts), written when a bus starts. A bus with an outbox keeps
 * its registry in the outbox's PostgreSQL instead (outbox/index.ts), where the CLI also looks.
 */
import type { KV } from '@nats-io/kv';
import type { ContractRegistry, RecordedService, ServiceRecord } from '../core/catalog.ts';
import { client } from './client.ts';
import type { NatsContext } from './context.ts';

/** A service name may hold `~`, which KV keys do not take; `=` is in no service name, so the mapping is reversible. */
const keyOf = (service: string) => service.replaceAll('~', '=');

export function natsRegistry(context: () => Promise<NatsContext>): ContractRegistry {
  let bucket: Promise<KV> | undefined;
  const open = () => {
    bucket ??= context().then((ctx) =>
      new (client().kv.Kvm)(ctx.js).create(`${ctx.settings.stream}_services`, {
        history: 1,
        replicas: ctx.settings.replicas,
        timeout: ctx.settings.publishTimeoutMs,
      }),
    );
    bucket.catch(() => {
      bucket = undefined;
    });
    return bucket;
  };
  return {
    async record(service: ServiceRecord): Promise<void> {
      const recorded: RecordedService = { ...service, recordedAt: new Date().toISOString() };
      await (await open()).put(keyOf(service.service), JSON.stringify(recorded));
    },
    async services(): Promise<RecordedService[]> {
      const kv = await open();
      const services: RecordedService[] = [];
      for await (const key of await kv.keys()) {
        const entry = await kv.get(key);
        if (entry === null || entry.operation !== 'PUT') continue;
        services.push(entry.json<RecordedService>());
      }
      return services.sort((a, b) => a.service.localeCompare(b.service));
    },
  };
}
