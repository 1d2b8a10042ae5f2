/**
 * Where Tidings reports what it recovers from by itself (a dropped connection, a failed batch, a disagreement
 * between workers) when no `onWarning` is given: the console, one line, with the error's message.
 */
export function defaultWarning(message: string, error?: unknown): void {
  console.warn(`[tidings] ${message}${error instanceof Error ? `: ${error.message}` : ''}`);
}
