/**
 * Reading the migrations from their .sql files: by index.ts when Tidings runs from its sources, and by
 * scripts/migrations.ts when `npm run build` puts their SQL inside the built JavaScript.
 */
import { readdirSync, readFileSync } from 'node:fs';

export interface MigrationFile {
  readonly version: number;
  readonly name: string;
  readonly sql: string;
}

/** `001_initial.sql`: a version and a name of lower-case words (safe to print inside SQL quotes). */
const MIGRATION_FILE = /^(\d{3})_([a-z0-9_]+)\.sql$/;

/** The migrations in `dir`, oldest first; a .sql file named otherwise is an error, not skipped. */
export function readMigrations(dir: URL): MigrationFile[] {
  return readdirSync(dir)
    .filter((file) => file.endsWith('.sql'))
    .sort()
    .map((file) => {
      const match = MIGRATION_FILE.exec(file);
      if (match === null) throw new Error(`Migration ${file}: name it NNN_lower_case_words.sql`);
      return { version: Number(match[1]), name: match[2]!, sql: readFileSync(new URL(file, dir), 'utf8') };
    });
}
