/** The subscription's durable pull consumers, one per bucket: declared on start, their settings kept current. */
import type { ConsumerConfig } from '@nats-io/jetstream';
import { client } from '../client.ts';
import { apiErrorCode } from '../errors.ts';
import { durableName, type WorkerContext } from './state.ts';

/** Declares the bucket's durable consumer, or brings the settings Tidings owns up to date. Idempotent. */
export async function ensureDurable(worker: WorkerContext, bucket: number): Promise<void> {
  const { nats, spec, maxPending } = worker;
  const { jsm, settings } = nats;
  const { jetstream, transport } = client();
  const name = durableName(worker, bucket);
  const config: Partial<ConsumerConfig> = {
    durable_name: name,
    description: `Tidings subscription ${spec.name}, bucket ${bucket} of ${settings.buckets}`,
    ack_policy: jetstream.AckPolicy.Explicit,
    filter_subject: `${settings.subjectPrefix}.${bucket}.>`,
    deliver_policy: spec.startFrom === 'beginning' ? jetstream.DeliverPolicy.All : jetstream.DeliverPolicy.New,
    ack_wait: transport.nanos(settings.ackWaitMs),
    max_ack_pending: maxPending,
    // Tidings counts attempts and dead-letters itself; JetStream must never drop a message on its own.
    max_deliver: -1,
  };
  const existing = await jsm.consumers.info(settings.stream, name).catch((error: unknown) => {
    if (apiErrorCode(error) === 10014) return undefined; // consumer not found
    throw error;
  });
  if (existing === undefined) {
    try {
      await jsm.consumers.add(settings.stream, config);
    } catch (error) {
      // Another worker created it at the same moment.
      if ((await jsm.consumers.info(settings.stream, name).catch(() => undefined)) === undefined) throw error;
    }
    return;
  }
  if (existing.config.ack_wait !== config.ack_wait || existing.config.max_ack_pending !== config.max_ack_pending) {
    await jsm.consumers.update(settings.stream, name, { ack_wait: config.ack_wait!, max_ack_pending: config.max_ack_pending! });
  }
}
