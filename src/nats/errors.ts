/** How the NATS client's and server's errors are told apart: what may pass, what never will. */
/**
 * The client's errors by name, not class: @nats-io/kv and @nats-io/jetstream pin exact versions of the
 * packages below them, so an application with other versions of them has two copies of each error class.
 */
const UNAVAILABLE = new Set([
  'TimeoutError',
  'ClosedConnectionError',
  'DrainingConnectionError',
  'ConnectionError',
  'NoResponders',
  'NoRespondersError',
  'RequestError',
]);

/** True for failures that a later try may not see: no connection, no JetStream answer, a timeout. */
export function isUnavailable(error: unknown): boolean {
  const { name, status } = (error ?? {}) as { name?: unknown; status?: unknown };
  return UNAVAILABLE.has(String(name)) || (apiErrorCode(error) !== undefined && status === 503);
}

/** What the client or the server says when a message breaks one of their limits, or undefined. */
export function refusedForGood(error: unknown): string | undefined {
  const message = String((error as Error | undefined)?.message);
  return /max_payload|header size exceeds|maximum payload|message size exceeds/i.test(message) ? message : undefined;
}

/** JetStream's error code (err_code) of a refused API request: 10059 stream not found, 10071 wrong last sequence... */
export function apiErrorCode(error: unknown): number | undefined {
  const { name, code } = (error ?? {}) as { name?: unknown; code?: unknown };
  return /^(?:JetStreamApiError|ConsumerNotFoundError|StreamNotFoundError)$/.test(String(name)) && typeof code === 'number' ? code : undefined;
}
