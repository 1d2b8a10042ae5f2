/**
 * The contracts registry in PostgreSQL: the `services` table (migration 011), one row per service with its
 * record (core/catalog.ts), written when a bus starts. Read by the CLI (`tidings asyncapi --system`) and by
 * brokers whose outbox is this database.
 */
import type { ContractRegistry, RecordedService, ServiceRecord } from '../core/catalog.ts';
import type { Queryable } from './connection/driver.ts';

function registrySql(schema: string) {
  return {
    record: `insert into "${schema}".services (service, record, recorded_at) values ($1, $2::jsonb, now())
             on conflict (service) do update set record = excluded.record, recorded_at = excluded.recorded_at`,
    services: `select record, recorded_at from "${schema}".services order by service`,
  };
}

/** The registry of `schema` through `db` (a driver, a pool, PGlite); `open` runs first (the backbone's, to migrate). */
export function postgresRegistry(db: () => Promise<Queryable>, schema: string): ContractRegistry {
  const sql = registrySql(schema);
  return {
    async record(service: ServiceRecord): Promise<void> {
      await (await db()).query(sql.record, [service.service, JSON.stringify(service)]);
    },
    async services(): Promise<RecordedService[]> {
      return readServices(await db(), schema);
    },
  };
}

/** Every service recorded in `schema`, by name. `schema` must be a checked identifier. */
export async function readServices(db: Queryable, schema: string): Promise<RecordedService[]> {
  const { rows } = await db.query<{ record: ServiceRecord | string; recorded_at: Date | string }>(registrySql(schema).services);
  return rows.map((row) => ({
    ...(typeof row.record === 'string' ? (JSON.parse(row.record) as ServiceRecord) : row.record),
    recordedAt: new Date(row.recorded_at).toISOString(),
  }));
}
