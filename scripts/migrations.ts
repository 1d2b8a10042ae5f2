/**
 * Writes dist/postgres/migrations/index.js with the migrations' SQL inside, in place of the module that
 * reads the .sql files from disk (src/postgres/migrations/index.ts): an application bundled into one file
 * (esbuild, webpack, ncc) then needs no files beside it. `npm run build` runs it after tsc.
 * test/migrations.unit.test.ts checks that both modules hold the same migrations.
 *
 *   node --import tsx scripts/migrations.ts [dist folder, default dist]
 */
import { writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { readMigrations } from '../src/postgres/migrations/files.ts';

export const SOURCES = new URL('../src/postgres/migrations/', import.meta.url);

/** The JavaScript of the built module: the source one's export, with the SQL as template literals. */
export function embeddedModule(dir: URL = SOURCES): string {
  const entries = readMigrations(dir).map(
    (migration) => `  {\n    version: ${migration.version},\n    name: '${migration.name}',\n    sql: \`${escapeTemplate(migration.sql)}\`,\n  },`,
  );
  return [
    '// Built by scripts/migrations.ts from src/postgres/migrations/*.sql (npm run build): the SQL ships inside the',
    '// JavaScript, so a bundled application needs no files beside it.',
    '',
    '/** Every migration of the PostgreSQL schema, oldest first. */',
    'export const migrations = [',
    ...entries,
    '];',
    '',
  ].join('\n');
}

/** The text of a template literal that evaluates to `text`. */
function escapeTemplate(text: string): string {
  return text.replaceAll('\\', '\\\\').replaceAll('`', '\\`').replaceAll('${', '\\${');
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const dist = new URL(`${process.argv[2] ?? 'dist'}/postgres/migrations/index.js`, pathToFileURL(`${process.cwd()}/`));
  writeFileSync(dist, embeddedModule());
}
