import type { AttemptRecord, Delivery, DeliveryHandler, DeliveryResult } from '../../core/backbone.ts';
import type { Envelope } from '../../core/envelope.ts';
import { describeError } from '../../core/errors.ts';
import type { PgTransaction } from '../transaction.ts';
import type { Attempt, SharedScope } from './scopes.ts';

/** How a message's attempts ended: acknowledged, to be retried after `delayMs`, or given up on. */
export type AttemptsResult =
  | { readonly kind: 'ack' }
  | { readonly kind: 'retry'; readonly delayMs: number; readonly attempt: number; readonly history: AttemptRecord[] }
  | { readonly kind: 'dead'; readonly reason: string; readonly history: AttemptRecord[] };

const ACKED: AttemptsResult = Object.freeze({ kind: 'ack' });

/** Runs one message's attempts: immediate retries in place, until it is acknowledged, delayed or dead. */
export class Attempts {
  constructor(
    private readonly handle: DeliveryHandler<PgTransaction>,
    private readonly stopping: () => boolean,
  ) {}

  async run(scope: SharedScope, envelope: Envelope, firstAttempt: number, history: AttemptRecord[]): Promise<AttemptsResult> {
    for (let attempt = firstAttempt; ; attempt++) {
      const attemptScope = scope.attempt();
      let result: DeliveryResult;
      try {
        result = await this.handle(new AttemptDelivery(envelope, attempt, attemptScope));
      } catch (error) {
        result = { outcome: 'retry', delayMs: 0, error: describeError(error) };
      }
      const lost = await attemptScope.end(result.outcome === 'ack');
      if (lost !== undefined) {
        result = {
          outcome: 'retry',
          delayMs: 0,
          error: describeError(new Error(`the handler returned, but a statement in its transaction failed, so its writes were rolled back: ${lost.message}`, { cause: lost })),
        };
      }
      if (result.outcome === 'ack') return ACKED;
      // In fast mode a failed attempt that wrote cannot be undone alone: the batch is replayed carefully.
      if (scope.abandoned) return { kind: 'retry', delayMs: 0, attempt, history };
      history.push({ attempt, at: new Date().toISOString(), error: result.error });
      if (result.outcome === 'dead-letter') return { kind: 'dead', reason: result.reason, history };
      if (result.delayMs > 0 || this.stopping()) return { kind: 'retry', delayMs: result.delayMs, attempt, history };
    }
  }
}

/** A delivery whose `tx` is the attempt's, made only if the handler (or a publish in it) reads it. */
class AttemptDelivery implements Delivery<PgTransaction> {
  constructor(
    readonly envelope: Envelope,
    readonly attempt: number,
    private readonly scope: Attempt,
  ) {}

  get tx(): PgTransaction {
    return this.scope.tx;
  }
}
