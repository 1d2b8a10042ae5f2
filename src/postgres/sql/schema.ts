import { checkIdentifier } from '../connection/identifiers.ts';

/** The schema as quoted SQL, once validated: what every operator statement module starts from. */
export function schemaOf(schema: string): string {
  return `"${checkIdentifier('schema', schema)}"`;
}

/** Appends `value` to `params` and returns its placeholder: values go to parameters, never into the text. */
export function param(params: unknown[], value: unknown): string {
  params.push(value);
  return `$${params.length}`;
}

/** `text` as a LIKE pattern that matches it literally. */
export function escapeLike(text: string): string {
  return text.replace(/[\\%_]/g, (char) => `\\${char}`);
}
