import type { Delivery, DeliveryHandler, DeliveryResult } from './backbone.ts';
import type { Envelope } from './envelope.ts';
import { describeError, type AttemptRecord } from './errors.ts';
import { subscriptionDefaults, type ResolvedRetry } from './options.ts';
import { afterFailure } from './retry.ts';

/**
 * The attempt loop every backbone runs for a message: run the pipeline, record each failed attempt, retry
 * at once while the policy says so, and end with an acknowledgement, a delayed retry (the backbone parks
 * the key) or a dead letter. Each backbone says only what it alone knows: how to open one attempt's
 * transaction (`open`), and when to stop retrying in place (`stopping`, `abandoned`).
 */

/** How a message's attempts ended. */
export type AttemptsResult =
  | { readonly kind: 'ack' }
  | { readonly kind: 'retry'; readonly delayMs: number; readonly attempt: number; readonly history: AttemptRecord[] }
  | { readonly kind: 'dead'; readonly reason: string; readonly history: AttemptRecord[] };

/** One attempt's transaction, as the backbone makes it. */
export interface AttemptScope<Tx> {
  /** The handler's `ctx.tx`: read only if the handler uses it (or publishes), so a backbone may open it then. */
  readonly tx: Tx | undefined;
  /** Keeps (the attempt succeeded) or drops its writes; returns why they could not be kept, if so. */
  end(keep: boolean): Promise<Error | undefined>;
}

export interface AttemptsOptions<Tx> {
  /** The number of the first attempt: 1, or the next after those a held or redelivered message has had. */
  readonly first: number;
  /** The attempts before it, kept with the message; failed attempts are added. */
  readonly history: AttemptRecord[];
  /** The subscription's policy, for failures the pipeline could not judge (see below). */
  readonly retry?: ResolvedRetry | undefined;
  /** The message as attempt `attempt` sees it (a backbone may give each attempt a fresh copy of the data). */
  readonly envelope: (attempt: number) => Envelope;
  readonly open: (attempt: number) => AttemptScope<Tx>;
  /** The consumer is stopping: a failed attempt is left to the next owner rather than retried at once. */
  readonly stopping: () => boolean;
  /** The backbone will run the whole batch again (PostgreSQL's fast mode after a write failed): stop, record nothing. */
  readonly abandoned?: () => boolean;
}

const ACKED: AttemptsResult = Object.freeze({ kind: 'ack' });

/**
 * Runs `envelope`'s attempts. Two failures reach here without the pipeline's verdict, and go through the
 * same retry policy: the pipeline itself threw (a bug below the handler), or the handler returned but its
 * writes could not be kept (a statement in its transaction failed and it caught the error). Either way the
 * policy bounds the retries, so no failure loops for ever.
 */
export async function runAttempts<Tx>(handle: DeliveryHandler<Tx>, options: AttemptsOptions<Tx>): Promise<AttemptsResult> {
  const { history } = options;
  const retry = options.retry ?? subscriptionDefaults.retry;
  for (let attempt = options.first; ; attempt++) {
    const scope = options.open(attempt);
    let result: DeliveryResult;
    try {
      result = await handle(new AttemptDelivery(options.envelope(attempt), attempt, scope));
    } catch (error) {
      result = afterFailure(
        retry,
        attempt,
        describeError(new Error(`the delivery failed below the handler (please report it): ${(error as Error)?.message}`, { cause: error })),
      );
    }
    const lost = await scope.end(result.outcome === 'ack');
    if (lost !== undefined) {
      const error = new Error(`the handler returned, but a statement in its transaction failed, so its writes were rolled back: ${lost.message}`, {
        cause: lost,
      });
      result = afterFailure(retry, attempt, describeError(error));
    }
    if (result.outcome === 'ack') return ACKED;
    if (options.abandoned?.()) return { kind: 'retry', delayMs: 0, attempt, history };
    history.push({ attempt, at: new Date().toISOString(), error: result.error });
    if (result.outcome === 'dead-letter') return { kind: 'dead', reason: result.reason, history };
    if (result.delayMs > 0 || options.stopping()) return { kind: 'retry', delayMs: result.delayMs, attempt, history };
  }
}

/** A delivery whose `tx` is read from its scope only when the handler (or a publish in it) reads it. */
class AttemptDelivery<Tx> implements Delivery<Tx> {
  constructor(
    readonly envelope: Envelope,
    readonly attempt: number,
    private readonly scope: AttemptScope<Tx>,
  ) {}

  get tx(): Tx | undefined {
    return this.scope.tx;
  }
}
