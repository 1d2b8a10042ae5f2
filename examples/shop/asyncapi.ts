/**
 * The shop's contracts as documentation: every service recorded what it publishes and handles in the
 * registry when it started, so one AsyncAPI 3.0 document of the whole system comes from the database, with
 * no service's code at hand. The committed examples/shop/asyncapi.json is that document on PostgreSQL; CI
 * checks it still matches (.ci/run: tidings asyncapi --check), as a team would in its own pipeline.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { asyncapiDocument, differences } from 'tidings/asyncapi';
import { readServices, type Queryable } from 'tidings/postgres';

export const COMMITTED = fileURLToPath(new URL('./asyncapi.json', import.meta.url));

/** Writes the system's document beside the other temporary files and says where, and whether the committed one still matches. */
export async function writeSystemDocument(db: Queryable, schema: string, backbone: string): Promise<void> {
  const services = await readServices(db, schema);
  const document = asyncapiDocument(services, { onWarning: (message) => console.log(`  warning: ${message}`) });
  const path = join(tmpdir(), `tidings-shop-asyncapi.${backbone}.json`);
  writeFileSync(path, `${JSON.stringify(document, null, 2)}\n`);
  console.log(
    `\nThe shop's AsyncAPI 3.0 document (${services.length} services, ${Object.keys(document.channels).length} channels, from the registry): ${path}`,
  );
  if (backbone !== 'postgres') {
    console.log(`  (with ${backbone} bindings; the committed ${relative(COMMITTED)} describes the shop on PostgreSQL)`);
    return;
  }
  const changed = differences(JSON.parse(readFileSync(COMMITTED, 'utf8')), document);
  console.log(
    changed.length === 0
      ? `  It matches the committed ${relative(COMMITTED)}.`
      : `  It differs from the committed ${relative(COMMITTED)} in ${changed.length} place(s): review, then cp ${path} ${relative(COMMITTED)}`,
  );
}

function relative(path: string): string {
  return path.startsWith(process.cwd()) ? path.slice(process.cwd().length + 1) : path;
}
