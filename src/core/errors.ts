/**
 * The few error classes Tidings throws. Each has a stable `code` a program can branch on, names the
 * message (id, topic, key) when there is one, and keeps the original error as `cause`.
 */

export type TidingsErrorCode =
  | 'INVALID_OPTIONS'
  | 'INVALID_CONTRACT'
  | 'INVALID_PAYLOAD'
  | 'PAYLOAD_TOO_LARGE'
  /** A message breaks one of `messageLimits` (an id or key too long, data nested too deep). */
  | 'LIMIT_EXCEEDED'
  | 'UNDECODABLE_MESSAGE'
  | 'NOT_STARTED'
  | 'STOPPED'
  | 'PUBLISH_FAILED'
  | 'HANDLER_TIMEOUT'
  | 'BACKBONE_UNAVAILABLE'
  /** A package the backbone needs (pg, PGlite, amqplib, nats) is not installed, or is and fails to load. */
  | 'PACKAGE_UNAVAILABLE'
  | 'SUBSCRIPTION_CONFLICT'
  | 'NO_TRANSACTION'
  /** `bus.transaction()` could not commit: a statement in it failed, and the callback caught the error. */
  | 'ROLLED_BACK'
  /** A replica's source did not answer a drift check or state transfer in time. */
  | 'SOURCE_UNAVAILABLE'
  /** A wait the caller bounded ran out (the memory backbone's `drain()`). */
  | 'TIMEOUT'
  /** `bus.request` got no reply in time. */
  | 'REQUEST_TIMEOUT'
  /** The handler of a `bus.request` failed for good: the request ended in dead letters. */
  | 'REQUEST_FAILED'
  /** A tenant id that is not one (quotes, NUL, too long): refused before it reaches any store. */
  | 'INVALID_TENANT'
  /** A message without a tenant, for a contract, bus or subscription that requires one. */
  | 'TENANT_REQUIRED'
  /** A handler of one tenant's message published for another, and its subscription is not cross-tenant. */
  | 'TENANT_FORBIDDEN'
  /** A message or transaction for a tenant that a backbone per tenant (tidings/stamps) has no stamp for. */
  | 'TENANT_UNKNOWN'
  /** A publish over its tenant's quota (`tenancy.quotas`): a TenantRateLimitedError, with `retryAfterMs`. */
  | 'TENANT_RATE_LIMITED';

export interface MessageRef {
  readonly id?: string;
  readonly topic?: string;
  readonly key?: string;
}

export class TidingsError extends Error {
  override name = 'TidingsError';
  readonly code: TidingsErrorCode;
  /** The message this error is about, if any. */
  readonly ref: MessageRef | undefined;
  /** True when trying the same operation again may succeed (a dropped connection, a restart). */
  readonly retryable: boolean;

  constructor(code: TidingsErrorCode, message: string, options: { cause?: unknown; ref?: MessageRef; retryable?: boolean } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.ref = options.ref;
    this.retryable = options.retryable ?? false;
  }
}

/** One problem found by a schema, with the path of the field it concerns. */
export interface ValidationIssue {
  readonly path: string;
  readonly message: string;
}

/** A payload broke its contract's schema: at publish (nothing was written) or on receive (dead-lettered). */
export class ValidationError extends TidingsError {
  override name = 'ValidationError';
  readonly issues: readonly ValidationIssue[];
  readonly contract: string;

  constructor(contract: string, issues: readonly ValidationIssue[], ref?: MessageRef) {
    const list = issues.map((i) => `${i.path || '(root)'}: ${i.message}`).join('; ');
    super('INVALID_PAYLOAD', `Payload for ${contract} is invalid: ${list}`, ref === undefined ? {} : { ref });
    this.issues = issues;
    this.contract = contract;
  }
}

/**
 * A publish over its tenant's quota (`tenancy.quotas`, docs/tenancy.md): nothing was written. Trying again
 * after `retryAfterMs` may succeed, if the tenant's other publishers leave it the tokens.
 */
export class TenantRateLimitedError extends TidingsError {
  override name = 'TenantRateLimitedError';
  readonly tenant: string;
  /** The contract published. */
  readonly contract: string;
  /** When the tenant's bucket holds enough tokens for this publish, at its rate, if no one else takes them. */
  readonly retryAfterMs: number;

  constructor(options: {
    tenant: string;
    contract: string;
    topic: string;
    count: number;
    ratePerSecond: number;
    burst: number;
    retryAfterMs: number;
    /** With `onLimit: 'wait'`: how long it waited, and the most it may. */
    waited?: { ms: number; maxWaitMs: number };
  }) {
    const what = options.count === 1 ? `${options.contract}` : `${options.count} messages of ${options.contract}`;
    const waited = options.waited === undefined ? '' : ` (it waited ${options.waited.ms} ms; waiting on would pass maxWaitMs, ${options.waited.maxWaitMs} ms)`;
    super(
      'TENANT_RATE_LIMITED',
      `Cannot publish ${what} for tenant ${options.tenant}: over its quota of ${options.ratePerSecond} messages/s (burst ${options.burst})${waited}; try again in ${options.retryAfterMs} ms, or raise tenancy.quotas for the tenant`,
      { ref: { topic: options.topic }, retryable: true },
    );
    this.tenant = options.tenant;
    this.contract = options.contract;
    this.retryAfterMs = options.retryAfterMs;
  }
}

/**
 * Throw this (or return `deadLetter(reason)`) from a handler when trying again cannot help: the message
 * goes to dead letters at once instead of burning its retries.
 */
export class PermanentError extends Error {
  override name = 'PermanentError';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** A handler ran past its timeout; it counts as a failed attempt. */
export class HandlerTimeoutError extends TidingsError {
  override name = 'HandlerTimeoutError';
  constructor(timeoutMs: number, ref: MessageRef) {
    super('HANDLER_TIMEOUT', `Handler did not finish within ${timeoutMs} ms (message ${ref.id} on ${ref.topic})`, {
      ref,
      retryable: true,
    });
  }
}

/** What went wrong, in words: an Error's message, anything else as a string. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

export function isPermanent(error: unknown): boolean {
  // A publish for another tenant (TENANT_FORBIDDEN) is the handler's bug: no retry makes it right.
  return error instanceof PermanentError || (error instanceof TidingsError && (error.code === 'INVALID_PAYLOAD' || error.code === 'TENANT_FORBIDDEN'));
}

/** One attempt at handling a message, as kept in retry and dead-letter histories. */
export interface AttemptRecord {
  readonly attempt: number;
  readonly at: string;
  readonly error: ErrorRecord;
}

/** A plain, JSON-safe description of an error for attempt histories and dead letters. */
export interface ErrorRecord {
  readonly name: string;
  readonly message: string;
  readonly stack?: string;
  readonly code?: string;
}

export function describeError(error: unknown): ErrorRecord {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return {
      name: storable(String(error.name), 200),
      message: storable(String(error.message), MAX_ERROR_TEXT),
      ...(typeof error.stack === 'string' ? { stack: storable(error.stack, MAX_ERROR_TEXT) } : {}),
      ...(typeof code === 'string' ? { code: storable(code, 200) } : {}),
    };
  }
  return { name: 'NonError', message: storable(safeString(error), MAX_ERROR_TEXT) };
}

/** Characters kept of an error's message or stack in histories and dead letters (each attempt keeps its own). */
const MAX_ERROR_TEXT = 16_384;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;
const LONE_SURROGATES = new RegExp(LONE_SURROGATE.source, 'g');

/**
 * Text from a handler (an error, a dead-letter reason) made fit to store anywhere: NUL characters and lone
 * surrogates, which PostgreSQL's text and jsonb refuse, become U+FFFD, and very long text is cut. Otherwise
 * one handler's odd error message would fail the acknowledgement of its whole batch, again and again.
 */
export function storable(text: string, max = MAX_ERROR_TEXT): string {
  const cut = text.length > max ? `${text.slice(0, max)}... (${text.length - max} more characters)` : text;
  return cut.includes('\0') || LONE_SURROGATE.test(cut) ? cut.replaceAll('\0', '\ufffd').replace(LONE_SURROGATES, '\ufffd') : cut;
}

function safeString(value: unknown): string {
  try {
    return typeof value === 'string' ? value : (JSON.stringify(value) ?? String(value));
  } catch {
    return String(value);
  }
}
