/**
 * A pino-style logger: a method per level taking a record of fields and a message. pino, bunyan-shaped
 * loggers and `console` adapters fit; Tidings writes structured records (message id, topic, subscription,
 * attempt) so a log search finds every line about one message.
 */
export interface Logger {
  error(record: object, message: string): void;
  warn(record: object, message: string): void;
  info(record: object, message: string): void;
  debug?(record: object, message: string): void;
}

/** Calls `write` and swallows what a broken logger throws: logging must never stop a worker. */
export function safely(write: () => void): void {
  try {
    write();
  } catch {
    // A logger that throws (a closed stream) loses its line; the message's work goes on.
  }
}

/** The bus's warnings written to `logger` (when no `onWarning` is given): a warn line, with the error as `err`. */
export function loggerWarning(logger: Logger): (message: string, error?: unknown) => void {
  return (message, error) => safely(() => logger.warn(error === undefined ? {} : { err: error }, message));
}
