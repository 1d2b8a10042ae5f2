/** Publishing to JetStream with confirms: each message on its bucket's subject, de-duplicated by its id. */
import type { Outgoing } from '../core/backbone.ts';
import { partitionOf } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import { subjectOf, toWire } from './codec.ts';
import type { NatsContext } from './context.ts';
import { isUnavailable, refusedForGood } from './errors.ts';

/** nats-server's default max_payload, for a connection that has not said its own. */
const DEFAULT_MAX_PAYLOAD = 1_048_576;

/**
 * Publishes every message at once on one connection, so JetStream stores them in the order given; each
 * carries its id as Nats-Msg-Id, so a retry within the duplicate window is stored once. A message NATS can
 * never take is refused before any is sent (toWire: LIMIT_EXCEEDED or INVALID_PAYLOAD, not retryable); a
 * publish not confirmed is BACKBONE_UNAVAILABLE (retryable).
 */
export async function publishAll(ctx: NatsContext, messages: readonly Outgoing[]): Promise<void> {
  const { js, nc, settings: s } = ctx;
  const maxPayload = nc.info?.max_payload ?? DEFAULT_MAX_PAYLOAD;
  const wires = messages.map((message) =>
    toWire(message, subjectOf(s.subjectPrefix, partitionOf(message.keyHash, s.buckets), message.envelope.topic), maxPayload),
  );
  const results = await Promise.allSettled(wires.map((wire) => js.publish(wire.subject, wire.payload, { headers: wire.headers, timeout: s.publishTimeoutMs })));
  const failed = results.findIndex((result) => result.status === 'rejected');
  if (failed === -1) return;
  const error = (results[failed] as PromiseRejectedResult).reason as unknown;
  const message = messages[failed]!.envelope;
  const stored = results.filter((result) => result.status === 'fulfilled').length;
  const ref = { id: message.id, topic: message.topic, key: message.partitionkey };
  const refused = refusedForGood(error);
  if (refused !== undefined) {
    // The server's limits differ from what toWire assumed (a cluster with a lower max_payload, say).
    throw new TidingsError('LIMIT_EXCEEDED', `NATS refused message ${message.id} (${message.topic}) for good: ${refused}`, {
      cause: error,
      ref,
      retryable: false,
    });
  }
  // Anything else may pass later: a server down or slow, a stream full with discard new, a leader election.
  throw new TidingsError(
    isUnavailable(error) ? 'BACKBONE_UNAVAILABLE' : 'PUBLISH_FAILED',
    `NATS did not confirm message ${message.id} (${message.topic})${messages.length > 1 ? ` and ${messages.length - stored - 1} more of ${messages.length}` : ''}: ${(error as Error).message}. Publish again with the same ids: JetStream drops copies within its duplicate window`,
    { cause: error, ref, retryable: true },
  );
}
