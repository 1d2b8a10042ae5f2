/**
 * Every migration of the PostgreSQL schema, oldest first, read from the .sql files beside this module: they
 * are the source of truth (read, reviewed and diffed as SQL), and a new one counts as soon as it is saved.
 * This is the module as it runs from the sources; `npm run build` replaces it in dist/ by one with the SQL
 * inside (scripts/migrations.ts), so a bundled application needs no files beside it.
 * test/migrations.unit.test.ts checks that the two hold the same migrations; tarball.smoke.test.ts bundles one.
 */
import { readMigrations, type MigrationFile } from './files.ts';

export const migrations: readonly MigrationFile[] = readMigrations(new URL('./', import.meta.url));
