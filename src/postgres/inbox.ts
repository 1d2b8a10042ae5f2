import { Batcher } from '../core/batching.ts';
import type { Queryable, SqlDriver } from './connection/driver.ts';
import type { Statements } from './statements.ts';

/**
 * One subscription's inbox (handled message ids), for consumers outside this backbone (a broker's, through
 * its outbox database: src/outbox): look-ups and records shared by concurrent deliveries, and the claim a
 * delivery's own transaction makes. One statement in flight per kind: the next batch fills while it runs,
 * and the pool keeps its connections for publishers and for handlers that open a transaction (the outbox
 * end-to-end bench row measures it).
 */
export class Inbox {
  readonly #seen: Batcher<string, boolean>;
  readonly #record: Batcher<string, undefined>;

  constructor(
    driver: SqlDriver,
    private readonly sql: Statements,
    private readonly subscription: string,
  ) {
    this.#seen = new Batcher(
      async (ids) => {
        const { rows } = await driver.query<{ message_id: string }>(sql.inboxSeen, [subscription, ids]);
        const found = new Set(rows.map((row) => row.message_id));
        return ids.map((id) => found.has(id));
      },
      { inFlight: 1 },
    );
    this.#record = new Batcher(
      async (ids) => {
        await driver.query(sql.inboxRecord, [subscription, ids]);
        return ids.map(() => undefined);
      },
      { inFlight: 1 },
    );
  }

  /** True if a delivery of this id was handled (and recorded) before. */
  seen(id: string): Promise<boolean> {
    return this.#seen.submit(id);
  }

  /** Records a handled id; resolves once committed, so the broker may then be acknowledged. */
  async record(id: string): Promise<void> {
    await this.#record.submit(id);
  }

  /**
   * Records `id` in `tx`, first thing: a concurrent delivery of the same message then waits on this row and
   * finds it handled. False if it was handled already (nothing of this delivery may be kept).
   */
  async claim(tx: Queryable, id: string): Promise<boolean> {
    const { rows } = await tx.query(this.sql.inboxClaim, [this.subscription, id]);
    return rows.length > 0;
  }
}
