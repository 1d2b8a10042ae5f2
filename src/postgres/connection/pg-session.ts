import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { TidingsError } from '../../core/errors.ts';
import type { Queryable, Statement } from './driver.ts';

/** The subset of `pg.PoolClient` used. */
export interface PgClientLike extends Queryable {
  release(error?: Error | boolean): void;
  on(event: 'error', listener: (error: Error) => void): unknown;
  off(event: 'error', listener: (error: Error) => void): unknown;
}

/** pg's query by config: `name` keeps the statement prepared on the connection. */
export interface PreparingPool {
  query<R>(config: { name: string; text: string; values: unknown[] }): Promise<{ rows: R[]; rowCount?: number | null }>;
}

const BEGIN: Statement = { text: 'begin', params: [] };
const COMMIT: Statement = { text: 'commit', params: [] };
const ROLLBACK: Statement = { text: 'rollback', params: [] };
/** SQLSTATE 25P02: a statement sent after one that failed in the same transaction. */
const IN_FAILED_TRANSACTION = '25P02';

function rolledBack(cause?: unknown): TidingsError {
  return new TidingsError(
    'ROLLED_BACK',
    'The transaction was rolled back, not committed: a statement in it failed and the callback caught the error; nothing of it was written',
    cause === undefined ? {} : { cause },
  );
}

interface PipelinedClient {
  /** pg's `pipeline: true`: statements are sent without waiting for the answers to the ones before. */
  readonly pipeline?: boolean;
  readonly connection?: { readonly stream?: { cork?(): void; uncork?(): void } };
}

/**
 * A transaction on one pooled connection that spends as few round trips as it can: BEGIN travels with the
 * first statement, the last statement with COMMIT, and a transaction whose only statement is the last one
 * runs it alone (a single statement commits by itself). Each round trip costs a socket write on both
 * sides, and on a small machine those writes are a third of the CPU a transaction costs; see bench/README.md.
 * On a pool that does not pipeline (one you gave without `pipeline: true`), the same statements go one by one.
 */
export class PgSession {
  #begun = false;
  /** A COPY in progress: the connection takes nothing else until it ends, so statements wait for it, in order. */
  #copying: Promise<void> | undefined;
  /** The last statement sent: once it is answered, so are all before it. */
  #last: Promise<unknown> | undefined;

  constructor(
    private readonly client: PgClientLike,
    private readonly copyFrom: (text: string) => NodeJS.WritableStream,
  ) {}

  get pipelined(): boolean {
    return this.#corkable() !== undefined;
  }

  run<R>(statement: Statement): Promise<{ rows: R[]; rowCount?: number | null }> {
    if (this.#copying !== undefined) return this.#copying.then(() => this.run<R>(statement));
    if (this.#begun) return this.#send<R>(statement);
    this.#begun = true;
    return this.#sendAll<R>([BEGIN, statement]);
  }

  /** Streams `rows` into `COPY ... FROM STDIN` (see CopyIn); a failure aborts the transaction. */
  copy(text: string, rows: Iterable<string>): Promise<void> {
    if (this.#copying !== undefined) return this.#copying.then(() => this.copy(text, rows));
    const copying = this.#copy(text, rows);
    const settled = copying.catch(() => undefined);
    this.#copying = settled;
    void settled.then(() => {
      if (this.#copying === settled) this.#copying = undefined;
    });
    return copying;
  }

  async #copy(text: string, rows: Iterable<string>): Promise<void> {
    if (!this.#begun) {
      this.#begun = true;
      this.#send(BEGIN).catch(() => undefined); // a failed BEGIN fails the COPY too
    }
    // pg refuses a COPY among pipelined statements: once those sent are answered, it goes alone.
    await this.#last?.catch(() => undefined);
    const client = this.client as unknown as { pipeline?: boolean; query(submittable: NodeJS.WritableStream): unknown };
    const pipelined = client.pipeline === true;
    if (pipelined) client.pipeline = false;
    try {
      const stream = this.copyFrom(text);
      const streamed = pipeline(Readable.from(rows), stream);
      client.query(stream);
      await streamed;
    } finally {
      if (pipelined) client.pipeline = true;
    }
  }

  async commit(last: Statement | undefined): Promise<void> {
    if (this.#copying !== undefined) await this.#copying;
    if (!this.#begun) {
      if (last !== undefined) await this.#send(last);
      return;
    }
    if (this.#status() === 'E') throw rolledBack();
    let outcome: { command?: string };
    try {
      outcome = (await this.#sendAll<never>(last === undefined ? [COMMIT] : [last, COMMIT])) as { command?: string };
    } catch (error) {
      if ((error as { code?: unknown }).code === IN_FAILED_TRANSACTION) throw rolledBack(error);
      throw error;
    }
    // COMMIT of a transaction in which a statement failed rolls it back.
    if (outcome.command === 'ROLLBACK') throw rolledBack();
  }

  /** Ends the transaction if it is still open (a pipelined COMMIT ends it even when a statement before it failed). */
  async rollback(): Promise<void> {
    if (this.#copying !== undefined) await this.#copying;
    if (!this.#begun || this.#status() === 'I') return;
    await this.#send(ROLLBACK);
  }

  /** The socket, when the client pipelines and statements can be gathered into one write on it. */
  #corkable(): { cork(): void; uncork(): void } | undefined {
    const { pipeline, connection } = this.client as PipelinedClient;
    const stream = connection?.stream;
    return pipeline === true && stream?.cork !== undefined && stream.uncork !== undefined ? (stream as { cork(): void; uncork(): void }) : undefined;
  }

  /** The server's last word on the transaction: 'I' idle, 'T' in one, 'E' in a failed one (undefined if the client does not say). */
  #status(): string | undefined {
    return (this.client as { getTransactionStatus?(): string | null }).getTransactionStatus?.() ?? undefined;
  }

  #send<R>(statement: Statement): Promise<{ rows: R[]; rowCount?: number | null }> {
    const { client } = this;
    const sent =
      statement.name === undefined
        ? client.query<R>(statement.text, statement.params)
        : (client as unknown as PreparingPool).query<R>({ name: statement.name, text: statement.text, values: statement.params as unknown[] });
    this.#last = sent;
    return sent;
  }

  /** Sends statements in one write and one round trip where the connection pipelines; resolves with the last one's result. */
  async #sendAll<R>(statements: readonly Statement[]): Promise<{ rows: R[]; rowCount?: number | null }> {
    const stream = this.#corkable();
    if (stream === undefined) {
      let result: { rows: R[]; rowCount?: number | null } | undefined;
      for (const statement of statements) result = await this.#send<R>(statement);
      return result!;
    }
    stream.cork();
    let sent: Array<Promise<{ rows: R[]; rowCount?: number | null }>>;
    try {
      sent = statements.map((statement) => this.#send<R>(statement));
    } finally {
      stream.uncork();
    }
    const settled = await Promise.allSettled(sent);
    const failed = settled.find((outcome) => outcome.status === 'rejected');
    if (failed !== undefined) throw failed.reason;
    return (settled[settled.length - 1] as PromiseFulfilledResult<{ rows: R[]; rowCount?: number | null }>).value;
  }
}
