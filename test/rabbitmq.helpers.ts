/** What the RabbitMQ tests share: a prefix per test, buses that clean up, and a plain amqplib client. */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import amqp from 'amqplib';
import pg from 'pg';
import { createBus, type Bus } from '../src/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { rabbitmq, type RabbitMqOptions } from '../src/rabbitmq/index.ts';
import { DATABASE_URL, dropSchema, RABBITMQ_URL, uniqueSchema } from './helpers.ts';

const run = promisify(execFile);

export const warnings: string[] = [];

/** Options for tests: short timeouts so failures show quickly. */
export function testOptions(prefix: string, connectionName = 'tidings-test'): Omit<RabbitMqOptions, 'outbox'> {
  return {
    url: RABBITMQ_URL,
    prefix,
    connectTimeoutMs: 5_000,
    publishTimeoutMs: 15_000,
    reconnectMinMs: 50,
    reconnectMaxMs: 500,
    heartbeatSeconds: 5,
    retryReturnGraceMs: 5_000,
    connectionName,
    onWarning: (message) => warnings.push(message),
  };
}

export class Harness {
  readonly prefix = `${uniqueSchema('tt')}.`;
  readonly schema = uniqueSchema('rq');
  /** The name of this harness' connections, so a fault test can close only its own. */
  readonly connectionName = `tidings-test-${this.prefix}`;
  readonly buses: Bus<PgTransaction>[] = [];
  #usedSchema = false;

  bus(service: string, options: { outbox?: boolean; relay?: boolean; rabbit?: Partial<RabbitMqOptions> } = {}): Bus<PgTransaction> {
    if (options.outbox) this.#usedSchema = true;
    const outbox = options.outbox ? postgres({ url: DATABASE_URL, schema: this.schema, onWarning: (message) => warnings.push(message) }) : undefined;
    const backbone = rabbitmq({ ...testOptions(this.prefix, this.connectionName), ...options.rabbit, ...(outbox === undefined ? {} : { outbox }), ...(options.relay === undefined ? {} : { relay: options.relay }) });
    const bus = createBus({ service, backbone });
    this.buses.push(bus);
    return bus;
  }

  async cleanup(): Promise<void> {
    for (const bus of this.buses) await bus.stop().catch(() => undefined);
    await deleteByPrefix(this.prefix);
    if (this.#usedSchema) await dropSchema(this.schema);
  }
}

/** Deletes the queues and exchanges whose names start with `prefix` (listed by rabbitmqctl when it is here). */
export async function deleteByPrefix(prefix: string): Promise<void> {
  const list = async (what: 'list_queues' | 'list_exchanges'): Promise<string[]> => {
    try {
      const { stdout } = await run('rabbitmqctl', ['-q', what, 'name'], { timeout: 30_000 });
      return stdout.split('\n').map((line) => line.trim()).filter((name) => name.startsWith(prefix));
    } catch {
      return [];
    }
  };
  const [queues, exchanges] = await Promise.all([list('list_queues'), list('list_exchanges')]);
  if (queues.length + exchanges.length === 0) return;
  const connection = await amqp.connect(RABBITMQ_URL);
  try {
    const channel = await connection.createChannel();
    for (const queue of queues) await channel.deleteQueue(queue);
    for (const exchange of exchanges) await channel.deleteExchange(exchange);
    await channel.close();
  } finally {
    await connection.close();
  }
}

export async function rabbitmqctl(...args: string[]): Promise<string> {
  const { stdout } = await run('rabbitmqctl', args, { timeout: 60_000 });
  return stdout;
}

/** Closes the server side of every connection named `name` (as a network failure would); returns how many. */
export async function closeConnections(name: string): Promise<number> {
  const listing = await rabbitmqctl('-q', 'list_connections', 'pid', 'client_properties');
  const pids = listing
    .split('\n')
    .filter((line) => line.includes(`{"connection_name","${name}"}`))
    .map((line) => line.split('\t')[0]!);
  await Promise.all(pids.map((pid) => rabbitmqctl('close_connection', pid, 'test')));
  return pids.length;
}

/** The tables rabbitmq-worker.ts writes: effects (through ctx.tx) and attempts (each attempt, kept). */
export async function createWorkerTables(schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: DATABASE_URL });
  await client.connect();
  try {
    await client.query(`create schema if not exists "${schema}"`);
    await client.query(
      `create table "${schema}".effects (n bigserial primary key, message_id text not null, key text not null, seq int not null, worker int not null, at timestamptz not null default clock_timestamp())`,
    );
    await client.query(
      `create table "${schema}".attempts (n bigserial primary key, message_id text not null, key text not null, seq int not null, attempt int not null, worker int not null, at timestamptz not null default clock_timestamp())`,
    );
  } finally {
    await client.end();
  }
}

/** How many messages wait in `queue` (0 if it does not exist). */
export async function messagesIn(queue: string): Promise<number> {
  const connection = await amqp.connect(RABBITMQ_URL);
  try {
    const channel = await connection.createChannel();
    channel.on('error', () => undefined);
    return (await channel.checkQueue(queue)).messageCount;
  } catch {
    return 0;
  } finally {
    await connection.close().catch(() => undefined);
  }
}
