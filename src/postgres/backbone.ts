/**
 * The PostgreSQL backbone's class: what `postgres()` returns. It opens the driver (pg or PGlite), migrates,
 * starts the notifier, the scheduler, retention and tenant isolation, and routes each Backbone call to the
 * file that does the work: publisher.ts (group commit, the commit-time insert, COPY), consume/ (the
 * consumer), replies.ts, dead-letters.ts, registry.ts, observe.ts (status and health), ops/ (operator code).
 */
import { defaultWarning } from '../core/warnings.ts';
import type { Backbone, Consumer, DeliveryHandler, Outgoing, Reply, SubscriptionSpec } from '../core/backbone.ts';
import type { SagaStore } from '../core/saga.ts';
import type { DeadLetterStore } from '../core/dead-letters.ts';
import type { Envelope } from '../core/envelope.ts';
import { TidingsError } from '../core/errors.ts';
import { resolveQuotas } from '../core/options.ts';
import { TenantQuotas } from '../core/quotas.ts';
import type { AnyContract } from '../core/contract.ts';
import { AckGroup } from './consume/ack-group.ts';
import { PostgresConsumer, type ConsumerSettings } from './consume/consumer.ts';
import { SuspendedTenants } from './consume/suspended.ts';
import { PostgresDeadLetters } from './dead-letters.ts';
import { readStatus } from './ops/status.ts';
import { postgresHealth, postgresStatus } from './observe.ts';
import type { BackboneStatus, HealthCheck } from '../telemetry/status.ts';
import type { BackboneObserver } from '../telemetry/observer.ts';
import { preparing, runStatement, type SqlDriver } from './connection/driver.ts';
import { pgDriver } from './connection/pg.ts';
import { pgliteDriver } from './connection/pglite.ts';
import { Inbox } from './inbox.ts';
import { LazyTransaction, type InboxClaim } from './lazy-transaction.ts';
import { copyRows, messagesJson, refuseUnstorable, toEnvelope, type LogRow } from './codec.ts';
import { migrate } from './migrate.ts';
import { Retention } from './retention.ts';
import { Notifier } from './notifier.ts';
import { GroupCommit, insertMessages, insertStatement } from './publisher.ts';
import { SCHEDULED_SIGNAL, Scheduler } from './scheduler.ts';
import { REPLY_SIGNAL, ReplyWaiter } from './replies.ts';
import { statements, type Statements } from './statements.ts';
import { TrackedTransaction, type AtCommit, type PgTransaction } from './transaction.ts';
import type { BackboneDescription, ContractRegistry } from '../core/catalog.ts';
import { postgresRegistry } from './registry.ts';
import { TenantIsolation, tenancyDefaults } from './tenants.ts';
import { PostgresTokenBuckets } from './quotas.ts';
import { checkPostgresOptions, postgresDefaults, type PostgresOptions } from './options.ts';

/**
 * The PostgreSQL backbone: a log table read in commit order, LISTEN/NOTIFY wake-ups from one connection per
 * process, partition leases for competing workers, and a transactional outbox for free (the log is in
 * your database). Works on a server by URL or pool, and on embedded PGlite.
 */
export class PostgresBackbone implements Backbone<PgTransaction> {
  readonly name = 'postgres';
  readonly options: PostgresOptions;
  readonly schema: string;
  #driver: SqlDriver | undefined;
  #sql: Statements;
  #notifier: Notifier | undefined;
  /** The workers (consumers) of this backbone, registered in `workers`: a NOTIFY need not wake them. */
  readonly #workers = new Set<string>();
  /** The consumers' acknowledgements that commit alone, committed together (ack-group.ts). */
  #acks: AckGroup | undefined;
  #groupCommit: GroupCommit | undefined;
  #opening: Promise<void> | undefined;
  #warn: (message: string, error?: unknown) => void;
  #nudges = new Set<NodeJS.Timeout>();
  #retention: Retention | undefined;
  #closing: Promise<void> | undefined;
  #scheduler: Scheduler | undefined;
  #replies: ReplyWaiter | undefined;
  /** The bus's telemetry (Backbone.observe): lost leases and the notifier's connection are told to it. */
  #observer: BackboneObserver | undefined;
  #isolation: TenantIsolation | undefined;
  #suspended: SuspendedTenants | undefined;
  readonly #quotas: TenantQuotas | undefined;

  constructor(options: PostgresOptions) {
    checkPostgresOptions(options);
    this.options = options;
    this.schema = options.schema ?? postgresDefaults.schema;
    this.#sql = statements(this.schema);
    this.#warn = options.onWarning ?? defaultWarning;
    const quotas = options.tenancy?.quotas;
    this.#quotas = quotas === undefined ? undefined : new TenantQuotas(resolveQuotas(quotas), this.tokenBuckets());
  }

  /** The tenants' token buckets in this database (migration 015, quotas.ts), for a broker whose outbox this is. */
  tokenBuckets(): PostgresTokenBuckets {
    return new PostgresTokenBuckets(() => this.driver, this.schema);
  }

  /** Waits for or refuses (TENANT_RATE_LIMITED) a publish over its tenant's quota (`tenancy.quotas`, see Backbone.admit). */
  async admit(tenant: string, contract: AnyContract, count: number, tx?: PgTransaction): Promise<void> {
    if (this.#quotas === undefined) return;
    await this.open();
    return this.#quotas.admit(tenant, contract, count, tx);
  }

  /** The driver, once open: for tools and tests that need to run SQL next to the bus. */
  get driver(): SqlDriver {
    if (this.#driver === undefined) throw new Error('The postgres backbone is not open yet: call bus.start() first');
    return this.#driver;
  }

  open(): Promise<void> {
    this.#opening ??= this.#open();
    return this.#opening;
  }

  async #open(): Promise<void> {
    const o = this.options;
    const driver =
      o.pglite !== undefined
        ? await pgliteDriver({ db: o.pglite === true ? undefined : o.pglite, dataDir: o.dataDir })
        : await pgDriver({ url: o.url, pool: o.pool, poolSize: o.poolSize ?? postgresDefaults.poolSize, name: this.schema });
    this.#driver = driver;
    this.#acks = new AckGroup(driver);
    if (o.migrate ?? postgresDefaults.migrate) await migrate(driver, this.schema);
    if ((o.tenancy?.isolation ?? tenancyDefaults.isolation) === 'rls') {
      const isolation = new TenantIsolation(this.schema, { ...o.tenancy, backboneUrl: o.url });
      await isolation.prepare(driver);
      await isolation.connect(this.schema);
      this.#isolation = isolation;
    }
    this.#notifier = new Notifier(driver, {
      channel: this.schema,
      pingMs: o.notifierPingMs ?? postgresDefaults.notifierPingMs,
      reconnectMinMs: postgresDefaults.reconnectMinMs,
      reconnectMaxMs: postgresDefaults.reconnectMaxMs,
      selfTestMs: postgresDefaults.selfTestMs,
      warn: this.#warn,
      connection: (lost, error) =>
        this.#observer?.emit(lost ? 'connection:lost' : 'connection:restored', {
          backbone: 'postgres',
          detail: `the notifier's connection to ${driver.description}`,
          ...(error === undefined ? {} : { error }),
        }),
      othersConsume: async () => {
        const { rows } = await driver.query<{ others: boolean }>(this.#sql.othersConsume, [[...this.#workers]]);
        return rows[0]?.others !== false;
      },
    });
    await this.#notifier.start();
    this.#suspended = new SuspendedTenants(driver, this.schema, o.heartbeatMs ?? postgresDefaults.heartbeatMs, this.#warn);
    await this.#suspended.start(this.#notifier);
    if (o.retention !== false) {
      this.#retention = new Retention(driver, { ...o.retention, schema: this.schema, onWarning: this.#warn });
      this.#retention.start();
    }
    this.#scheduler = new Scheduler(
      driver,
      this.#sql,
      this.#notifier,
      {
        leaseMs: o.leaseMs ?? postgresDefaults.leaseMs,
        heartbeatMs: o.heartbeatMs ?? postgresDefaults.heartbeatMs,
        batchSize: postgresDefaults.scheduledBatch,
      },
      this.#warn,
    );
    this.#workers.add(this.#scheduler.owner);
    this.#scheduler.start();
    const batch = { ...postgresDefaults.publishBatch, ...o.publishBatch };
    const writer = preparing(driver);
    const notifier = this.#notifier;
    this.#groupCommit = new GroupCommit(
      batch,
      (messages, topics) => insertMessages(writer, this.#sql, messages, notifier.othersListening() ? notifier.payload(topics) : undefined),
      (topics) => notifier.poke(topics, true),
    );
  }

  async publish(messages: readonly Outgoing[], tx?: PgTransaction): Promise<void> {
    // Refuse what PostgreSQL cannot store here, so one bad message cannot fail the group commit that
    // other callers' messages share.
    refuseUnstorable(messages);
    await this.open();
    if (messages.some((message) => message.dueAt !== undefined)) return this.#schedule(messages, tx);
    if (tx === undefined) return this.#groupCommit!.publish(messages);
    if (tx instanceof TrackedTransaction && tx.atCommit !== undefined) {
      // Written with the commit: one statement for all of the transaction's messages, in its round trip.
      for (const message of messages) {
        tx.atCommit.messages.push(message);
        tx.published.add(message.envelope.topic);
      }
      return;
    }
    await insertMessages(tx, this.#sql, messages);
    if (tx instanceof TrackedTransaction) {
      for (const message of messages) tx.published.add(message.envelope.topic);
      return;
    }
    // A transaction the caller drives: we cannot see its commit. Wake consumers shortly after, when it
    // has most likely committed; if it has not, the backstop poll finds the messages.
    const topics = new Set(messages.map((message) => message.envelope.topic));
    const nudge = setTimeout(() => {
      this.#nudges.delete(nudge);
      this.#notifier?.poke(topics);
    }, this.options.foreignCommitNudgeMs ?? postgresDefaults.foreignCommitNudgeMs);
    this.#nudges.add(nudge);
  }

  /**
   * Writes messages due later to `scheduled` (migration 007), in `tx` or on their own; the scheduler's leader
   * moves them into the log when they are due (scheduler.ts). If one is due before the leader's next
   * wake-up, the commit wakes it (the `scheduled` signal, in this process and by NOTIFY in others).
   */
  async #schedule(messages: readonly Outgoing[], tx: PgTransaction | undefined): Promise<void> {
    const soon = messages.some((message) => message.dueAt! - Date.now() < (this.options.heartbeatMs ?? postgresDefaults.heartbeatMs));
    const signal = `!${SCHEDULED_SIGNAL}`;
    const insert = { name: `tidings.${this.schema}.schedule`, text: this.#sql.insertScheduled, params: [messagesJson(messages)] };
    if (tx === undefined) {
      await runStatement(preparing(this.driver), insert);
      if (soon) this.#notifier?.poke([signal]);
      return;
    }
    await runStatement(tx instanceof TrackedTransaction ? tx : { query: (text, params) => tx.query(text, params) }, insert);
    if (!soon) return;
    if (tx instanceof TrackedTransaction) tx.published.add(signal);
    else {
      const nudge = setTimeout(() => {
        this.#nudges.delete(nudge);
        this.#notifier?.poke([signal]);
      }, this.options.foreignCommitNudgeMs ?? postgresDefaults.foreignCommitNudgeMs);
      this.#nudges.add(nudge);
    }
  }

  async claimTick(name: string, definition: string, tick: number, tx: PgTransaction): Promise<boolean> {
    const { rows } = await tx.query(this.#sql.claimTick, [name, definition, new Date(tick)]);
    return rows.length > 0;
  }

  async lastTick(name: string): Promise<{ tick: number; definition: string } | undefined> {
    await this.open();
    const { rows } = await this.driver.query<{ definition: string; last_tick: Date | string }>(this.#sql.lastTick, [name]);
    return rows[0] === undefined ? undefined : { tick: new Date(rows[0].last_tick).getTime(), definition: rows[0].definition };
  }

  /** The contracts registry in this schema (registry.ts): services record themselves there when they start. */
  contracts(): ContractRegistry {
    return postgresRegistry(async () => {
      await this.open();
      return this.driver;
    }, this.schema);
  }

  describe(): BackboneDescription {
    return { name: this.name, settings: { schema: this.schema } };
  }

  sagas(): SagaStore<PgTransaction> {
    const sql = this.#sql;
    return {
      async load(tx, saga, id) {
        const { rows } = await tx.query<{ state: unknown; version: number; completed: boolean }>(sql.loadSaga, [saga, id]);
        const row = rows[0];
        return row === undefined ? undefined : { state: row.state, version: Number(row.version), completed: row.completed };
      },
      find: async (saga, id) => {
        await this.open();
        const { rows } = await this.driver.query<{ state: unknown; version: number; completed: boolean }>(sql.findSaga, [saga, id]);
        const row = rows[0];
        return row === undefined ? undefined : { state: row.state, version: Number(row.version), completed: row.completed };
      },
      async save(tx, saga, id, row, cause) {
        const { rows } = await tx.query<{ saved: number }>(sql.saveSaga, [
          saga,
          id,
          JSON.stringify(row.state),
          row.version,
          row.completed,
          cause.messageId,
          cause.topic,
        ]);
        return Number(rows[0]?.saved ?? 0) > 0;
      },
    };
  }

  /** Records a request's answer (see Backbone.reply): in `tx`, whose commit wakes the requester, or on its own. */
  async reply(requestId: string, reply: Reply, tx?: PgTransaction): Promise<void> {
    await this.open();
    const params = [requestId, reply.data === undefined ? null : JSON.stringify(reply.data), reply.error === undefined ? null : JSON.stringify(reply.error)];
    const signal = `!${REPLY_SIGNAL}`;
    if (tx === undefined) {
      await this.driver.query(this.#sql.insertReply, params);
      this.#notifier?.poke([signal]);
      return;
    }
    await tx.query(this.#sql.insertReply, params);
    if (tx instanceof TrackedTransaction) tx.published.add(signal);
    else setTimeout(() => this.#notifier?.poke([signal]), this.options.foreignCommitNudgeMs ?? postgresDefaults.foreignCommitNudgeMs);
  }

  async awaitReply(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    await this.open();
    this.#replies ??= new ReplyWaiter(this.driver, this.#sql, this.#notifier!, postgresDefaults.replyPollMs, this.#warn);
    return this.#replies.await(requestId, signal, late);
  }

  /** Cancels a message scheduled for later that is not due yet (see Backbone.cancelScheduled). */
  async cancelScheduled(id: string): Promise<boolean> {
    await this.open();
    const { rows } = await this.driver.query(this.#sql.cancelScheduled, [id]);
    return rows.length > 0;
  }

  /**
   * In a `bus.transaction()` on a server, the messages are streamed with COPY, each chunk as soon as it is
   * encoded, so PostgreSQL ingests one while the next is encoded (a bulk publish is about half each, and COPY
   * costs the server a third of what an INSERT of the same rows does). Messages published before it in the
   * transaction go first, to keep their order. Elsewhere, all of them are written as one `publish`.
   */
  async publishChunks(chunks: Iterable<readonly Outgoing[]>, tx: PgTransaction): Promise<void> {
    if (!(tx instanceof TrackedTransaction) || tx.atCommit === undefined || tx.copyIn === undefined) return this.publish([...chunks].flat(), tx);
    const { atCommit, published, copyIn } = tx;
    const earlier = atCommit.messages.splice(0);
    const encode = (chunk: readonly Outgoing[]): string => {
      refuseUnstorable(chunk);
      for (const message of chunk) published.add(message.envelope.topic);
      return copyRows(chunk);
    };
    function* rows(): Generator<string> {
      if (earlier.length > 0) yield encode(earlier);
      for (const chunk of chunks) yield encode(chunk);
    }
    try {
      await copyIn(this.#sql.copyMessages, rows());
    } catch (error) {
      // Part of the messages may be written already: the transaction must not commit them alone.
      atCommit.failure = error;
      throw error;
    }
  }

  async transaction<T>(fn: (tx: PgTransaction) => Promise<T>): Promise<T> {
    await this.open();
    const published = new Set<string>();
    const atCommit: AtCommit = { messages: [] };
    const result = await this.driver.transaction(
      (inner) => fn(new TrackedTransaction(inner, published, atCommit)),
      () => {
        if (atCommit.failure !== undefined) {
          throw new TidingsError(
            'ROLLED_BACK',
            `The transaction was rolled back, not committed: a publish in it failed after part of its messages were written (${(atCommit.failure as Error).message}), and the callback caught the error; nothing of it was written`,
            { cause: atCommit.failure },
          );
        }
        return atCommit.messages.length === 0 ? undefined : insertStatement(this.#sql, atCommit.messages);
      },
    );
    if (published.size > 0) this.#notifier?.poke(published);
    return result;
  }

  async consume(spec: SubscriptionSpec, handle: DeliveryHandler<PgTransaction>): Promise<Consumer> {
    await this.open();
    const o = this.options;
    const settings: ConsumerSettings = {
      leaseMs: o.leaseMs ?? postgresDefaults.leaseMs,
      heartbeatMs: o.heartbeatMs ?? postgresDefaults.heartbeatMs,
      pollMs: o.pollMs ?? postgresDefaults.pollMs,
      fallbackPollMs: o.fallbackPollMs ?? postgresDefaults.fallbackPollMs,
      errorBackoffMaxMs: postgresDefaults.errorBackoffMaxMs,
      // One session (PGlite): a second transaction would wait for the first, whose handlers may wait for it.
      handlerConnections: this.driver.embedded
        ? 1
        : (o.handlerConnections ?? Math.max(1, Math.min(postgresDefaults.handlerConnections, Math.floor((o.poolSize ?? postgresDefaults.poolSize) / 2)))),
    };
    const consumer = new PostgresConsumer(
      {
        driver: this.driver,
        sql: this.#sql,
        notifier: this.#notifier!,
        acks: this.#acks!,
        settings,
        warn: this.#warn,
        committed: (topics) => this.#notifier?.poke(topics),
        workers: this.#workers,
        observer: this.#observer,
        isolation: this.#isolation,
        suspended: this.#suspended,
      },
      spec,
      handle,
    );
    await consumer.start();
    return consumer;
  }

  /** The inbox of `subscription` in this database, for a consumer of another backbone (a broker's, through its outbox). Needs the backbone open. */
  inbox(subscription: string): Inbox {
    return new Inbox(this.driver, this.#sql, subscription);
  }

  /** A delivery's `ctx.tx` for a consumer of another backbone, opened on first use, recording `claim` in the inbox first (see lazy-transaction.ts). */
  lazyTransaction(claim?: InboxClaim): LazyTransaction {
    return new LazyTransaction((fn) => this.transaction(fn), claim);
  }

  /** Messages committed to `subscription`'s topics and not yet handled by it; 0 when it does not exist yet. */
  async lag(subscription: string): Promise<number> {
    await this.open();
    const status = await readStatus(this.driver, { schema: this.schema, subscription }).catch(() => undefined);
    return status?.subscriptions[0]?.lag ?? 0;
  }

  /**
   * The log's committed messages, oldest first: the newest `limit` (10,000 by default), of `topic` or of all
   * topics. For tests (tidings/testing's `published()` reads it), not for consuming.
   */
  async messages(topic?: string, limit = 10_000): Promise<Envelope[]> {
    await this.open();
    return (await this.driver.query<LogRow>(this.#sql.newestMessages, [limit, topic ?? null])).rows.map(toEnvelope);
  }

  observe(observer: BackboneObserver): void {
    this.#observer = observer;
  }

  /** Lag, held keys and dead letters per subscription, for the metrics' gauges (observe.ts). */
  async status(): Promise<BackboneStatus> {
    await this.open();
    return postgresStatus(this.driver, this.schema);
  }

  /** The database reachable, the notifier listening or polling: for `bus.health()` (observe.ts). */
  async health(): Promise<readonly HealthCheck[]> {
    await this.open();
    return postgresHealth(this.driver, this.driver.description, this.#notifier?.listening);
  }

  deadLetters(): DeadLetterStore {
    return new PostgresDeadLetters(async () => {
      await this.open();
      return this.driver;
    }, this.schema);
  }

  /** Closes what `open` opened. Every call gets the same promise: two callers must not end the pool twice. */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    for (const nudge of this.#nudges) clearTimeout(nudge);
    this.#nudges.clear();
    this.#quotas?.close();
    if (this.#opening === undefined) return;
    await this.#opening.catch(() => undefined);
    this.#replies?.close();
    await this.#scheduler?.stop();
    await this.#retention?.stop();
    await this.#notifier?.close();
    this.#suspended?.stop();
    await this.#isolation?.close();
    await this.#driver?.close();
  }
}
