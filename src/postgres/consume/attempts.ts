import type { SubscriptionSpec } from '../../core/backbone.ts';
import type { AttemptRecord } from '../../core/errors.ts';
import { runAttempts, type AttemptsResult } from '../../core/attempts.ts';
import type { DeliveryHandler } from '../../core/backbone.ts';
import type { Envelope } from '../../core/envelope.ts';
import type { PgTransaction } from '../transaction.ts';
import { scopeOf } from '../tenants.ts';
import type { SharedScope } from './scopes.ts';

export type { AttemptsResult } from '../../core/attempts.ts';

/** A message's attempts (core/attempts.ts), each in its own scope of the batch's transaction (scopes.ts). */
export class Attempts {
  constructor(
    private readonly handle: DeliveryHandler<PgTransaction>,
    private readonly spec: SubscriptionSpec,
    private readonly stopping: () => boolean,
  ) {}

  run(scope: SharedScope, envelope: Envelope, first: number, history: AttemptRecord[]): Promise<AttemptsResult> {
    return runAttempts(this.handle, {
      first,
      history,
      retry: this.spec.retry,
      envelope: () => envelope,
      open: () => scope.attempt(scopeOf(envelope.tenant, this.spec.crossTenant === true)),
      stopping: this.stopping,
      // In fast mode a failed attempt that wrote cannot be undone alone: the batch is replayed carefully.
      abandoned: () => scope.abandoned,
    });
  }
}
