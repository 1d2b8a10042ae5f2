import { TidingsError } from '../../core/errors.ts';

const IDENT = /^[a-z_][a-z0-9_]{0,62}$/;

/** Validates an identifier Tidings puts in SQL text (schema, channel): never interpolate anything else. */
export function checkIdentifier(kind: string, name: string): string {
  if (!IDENT.test(name)) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `${kind} ${JSON.stringify(name)} is invalid: use lower-case letters, digits and "_", starting with a letter, at most 63 characters`,
    );
  }
  return name;
}

/** `name` quoted as an SQL identifier, for the statements that take no parameter in its place (LISTEN). */
export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}
