/**
 * The services the `asyncapi` and `contracts` commands read: from a module of the code (module.ts), or from
 * the registry the services write when they start, in PostgreSQL (a bus's database, or a broker's outbox) or
 * in a NATS bus's KV bucket.
 */
import type { Command } from 'commander';
import { TidingsError } from 'tidings';
import type { ServiceRecord } from 'tidings/asyncapi';
import { readServices } from 'tidings/postgres';
import { CommandFailed, globalsOf, type CliContext } from './context.ts';
import { withDatabase } from './database.ts';
import { loadModule } from './module.ts';

/** The services of `--module`'s code, or of the registry in the database. */
export async function serviceRecords(
  context: CliContext,
  command: Command,
  module: string | undefined,
  warn: (message: string) => void,
): Promise<ServiceRecord[]> {
  if (module !== undefined) {
    const { services } = await loadModule(module, context.cwd ?? process.cwd(), warn);
    if (services.length === 0)
      throw new TidingsError('INVALID_OPTIONS', `--module ${module} exports contracts but no bus: export the buses to document operations`);
    return services;
  }
  const globals = globalsOf(context, command);
  if (globals.url !== undefined && /^amqps?:\/\//.test(globals.url)) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      "RabbitMQ keeps no registry: services on RabbitMQ record themselves in their outbox's PostgreSQL; give its URL (--url postgres://...)",
    );
  }
  if (globals.url !== undefined && /^nats:\/\//.test(globals.url)) return natsServices(globals.url, globals.stream, globals.connectTimeout);
  let services: ServiceRecord[] = [];
  await withDatabase(context, command, async (db) => {
    const { rows } = await db.driver.query<{ found: boolean }>('select to_regclass($1) is not null as found', [`"${globals.schema}".services`]);
    const migrated = rows[0]?.found === true;
    const logged =
      migrated || (await db.driver.query<{ found: boolean }>('select to_regclass($1) is not null as found', [`"${globals.schema}".log`])).rows[0]?.found;
    if (!migrated && logged) {
      throw new CommandFailed(
        `Schema ${globals.schema} has no registry yet (migration 011): run tidings migrate --schema ${globals.schema}, then restart the services so they record themselves`,
      );
    }
    services = await readServices(db.driver, globals.schema);
  });
  return services;
}

/** The registry of a NATS bus without an outbox: the stream's KV bucket of services. */
async function natsServices(url: string, stream: string | undefined, connectTimeout: number): Promise<ServiceRecord[]> {
  const { nats, natsDefaults } = await import('tidings/nats');
  const backbone = nats({
    servers: url,
    stream: stream ?? natsDefaults.stream,
    relay: false,
    publishTimeoutMs: connectTimeout * 1_000,
    onWarning: () => undefined,
  });
  try {
    return (await backbone.contracts()?.services()) ?? [];
  } finally {
    await backbone.close().catch(() => undefined);
  }
}
