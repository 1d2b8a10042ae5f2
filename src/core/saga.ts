import type { StandardSchemaV1 } from './standard-schema.ts';
import { defineCommand, validateName, type AnyContract, type Contract, type DataOf } from './contract.ts';
import type { Message } from './envelope.ts';
import { PermanentError, TidingsError, ValidationError } from './errors.ts';
import { retryLater, type HandlerContext, type Outcome } from './handler.ts';
import type { Backbone, SagaRow, SagaStore } from './backbone.ts';
import { bytesOver, messageLimits } from './limits.ts';

export type { SagaRow, SagaStore } from './backbone.ts';

/**
 * Sagas (process managers): long-running, message-driven state machines. A saga instance is identified by a
 * correlation id taken from each message; its state lives in the backbone's database (SagaStore) and is
 * loaded, changed and saved in the same transaction as the message's acknowledgement, so each transition
 * happens exactly once, also across `kill -9`. Two messages for one instance at once: the second waits for
 * the first's row (or, for a first transition, loses the insert and is retried on the new state): never a
 * lost update. Timeouts are scheduled messages (`ctx.requestTimeout`) that come back to the saga.
 */

/** What a saga's handlers get besides the message: the handler's context, and the saga's own powers. */
export interface SagaContext<Tx = unknown> extends HandlerContext<Tx> {
  /** The instance's correlation id. */
  readonly sagaId: string;
  /** Its state's version before this transition (0 when this message starts it). */
  readonly version: number;
  /**
   * Asks for `timeouts[name]` to run after `delayMs` with `data` (a scheduled message, in this transition's
   * transaction). One that fires after the saga completed is ignored, and counted.
   */
  requestTimeout(name: string, delayMs: number, data?: unknown): Promise<void>;
  /** Ends the saga after this transition: later messages and timeouts for it are ignored. */
  complete(): void;
}

/** A transition: the new state, or nothing to keep the state as it is; or an Outcome (retryLater, deadLetter). */
export type Transition<S> = S | void | Outcome;

export interface SagaDefinition<S, M extends Record<string, AnyContract>> {
  /** Lower-case words joined by `.`, `-` or `_`; its subscription is `saga.<name>`. */
  readonly name: string;
  /** The state's schema: every state a transition returns is checked against it before it is saved. */
  readonly state: StandardSchemaV1<S, S>;
  /** The messages it reacts to, by a name of your choosing. */
  readonly messages: M;
  /** How each message names the instance it belongs to. */
  readonly correlate: { readonly [K in keyof M]: (data: DataOf<M[K]>) => string };
  /** The messages that start an instance: each returns its first state. */
  readonly start: { readonly [K in keyof M]?: (message: Message<DataOf<M[K]>>, ctx: SagaContext) => S | Promise<S> };
  /** Transitions of a started instance. A message that starts instances also goes here when its instance exists. */
  readonly handle?: { readonly [K in keyof M]?: (state: S, message: Message<DataOf<M[K]>>, ctx: SagaContext) => Transition<S> | Promise<Transition<S>> };
  /** What runs when a timeout asked for by `ctx.requestTimeout(name, ...)` fires. */
  readonly timeouts?: { readonly [name: string]: (state: S, data: unknown, ctx: SagaContext) => Transition<S> | Promise<Transition<S>> };
  /**
   * A message for an instance that has not started (it overtook the one that starts it): `'dead-letter'` it
   * (default: redrive it once the saga has started), `'retry'` it after `retryEarlyMs` while its attempts last
   * (only when its key differs from the starting message's: a retry holds its key, and the starting message
   * would wait behind it), or `'ignore'` it. Better still, let it start the saga too (`start`).
   */
  readonly early?: 'retry' | 'dead-letter' | 'ignore';
}

export const sagaDefaults = {
  early: 'dead-letter',
  /** How long a message that came before its saga started waits before it is tried again. */
  retryEarlyMs: 1_000,
} as const;

/** The scheduled message a saga's timeout travels as. */
function timeoutContract(saga: string) {
  return defineCommand(`tidings.saga.${saga}.timeout`, {
    schema: {
      '~standard': { version: 1, vendor: 'tidings', validate: (value: unknown) => ({ value: value as TimeoutData }) },
    } as StandardSchemaV1<TimeoutData>,
    key: (data) => data.id,
    description: `A timeout of saga ${saga}`,
    toJSONSchema: () => ({
      type: 'object',
      properties: { id: { type: 'string', description: "the saga instance's id" }, name: { type: 'string', description: 'the timeout asked for' }, data: {} },
      required: ['id', 'name'],
    }),
  });
}

interface TimeoutData {
  readonly id: string;
  readonly name: string;
  readonly data?: unknown;
}

/** Declares a saga; run it with `bus.saga(definition)`. */
export function defineSaga<S, M extends Record<string, AnyContract>>(definition: SagaDefinition<S, M>): SagaDefinition<S, M> {
  validateName('Saga', definition?.name);
  const problems: string[] = [];
  if (typeof definition.state?.['~standard']?.validate !== 'function') problems.push('state must be a Standard Schema (zod 4, valibot, arktype...)');
  const names = Object.keys(definition.messages ?? {});
  if (names.length === 0) problems.push('messages must name at least one contract');
  for (const name of names) {
    if (definition.messages[name]?.topic === undefined) problems.push(`messages.${name} must be a contract (defineEvent or defineCommand)`);
    if (typeof definition.correlate?.[name] !== 'function') problems.push(`correlate.${name} must be a function from the message's data to the saga's id`);
    if (definition.start?.[name] === undefined && definition.handle?.[name] === undefined) problems.push(`messages.${name} is neither in start nor in handle`);
  }
  if (Object.keys(definition.start ?? {}).length === 0) problems.push('start must name at least one message that starts the saga');
  for (const name of [...Object.keys(definition.start ?? {}), ...Object.keys(definition.handle ?? {})]) {
    if (!names.includes(name)) problems.push(`${name} is not one of messages (${names.join(', ')})`);
  }
  if (definition.early !== undefined && !['retry', 'dead-letter', 'ignore'].includes(definition.early))
    problems.push(`early must be "retry", "dead-letter" or "ignore", got ${JSON.stringify(definition.early)}`);
  if (problems.length > 0) throw new TidingsError('INVALID_CONTRACT', `Saga ${definition.name} is invalid: ${problems.join('; ')}`);
  return Object.freeze({ ...definition });
}

/**
 * Counts of what a saga did in this process: transitions run, as a handler's `handled` counts attempts (a
 * batch rolled back and run again counts twice); the store holds what committed.
 */
export interface SagaStats {
  started: number;
  transitions: number;
  completed: number;
  /** Messages and timeouts for an instance that had completed. */
  ignoredAfterCompletion: number;
  /** Messages for an instance that had not started, ignored or dead-lettered (`early`). */
  early: number;
}

/** One of a saga's handlers: for a message it reacts to, or for its timeouts. */
interface SagaHandler<Tx> {
  readonly contract: AnyContract;
  readonly handler: (message: Message<unknown>, ctx: HandlerContext<Tx>) => Promise<Outcome | void>;
}

/** What `bus.saga` subscribes: the saga's subscription (`saga.<name>`), its handlers, and the counts they keep. */
interface SagaRun<Tx> {
  readonly subscription: string;
  readonly handlers: readonly SagaHandler<Tx>[];
  readonly stats: SagaStats;
}

/** Runs `definition` on `backbone`'s saga store; refuses a backbone that keeps no saga state. */
export function sagaRun<S, M extends Record<string, AnyContract>, Tx>(definition: SagaDefinition<S, M>, backbone: Backbone<Tx>): SagaRun<Tx> {
  const store = backbone.sagas?.();
  if (store === undefined) throw new TidingsError('INVALID_OPTIONS', `Saga ${definition.name}: the ${backbone.name} backbone cannot keep saga state`);
  const stats: SagaStats = { started: 0, transitions: 0, completed: 0, ignoredAfterCompletion: 0, early: 0 };
  return { subscription: `saga.${definition.name}`, handlers: sagaHandlers(definition, { store }, stats), stats };
}

/** What running a saga needs of the bus. */
interface SagaHost<Tx> {
  readonly store: SagaStore<Tx>;
}

/**
 * The handlers a saga's subscription runs: one per message it reacts to, and one for its timeouts. Each
 * loads the instance in the message's transaction, runs the transition, checks and saves the new state.
 */
function sagaHandlers<S, M extends Record<string, AnyContract>, Tx>(definition: SagaDefinition<S, M>, host: SagaHost<Tx>, stats: SagaStats): SagaHandler<Tx>[] {
  const saga = definition.name;
  const timeouts = timeoutContract(saga);
  const early = definition.early ?? sagaDefaults.early;

  const transition = async (
    id: string,
    message: Message<unknown>,
    ctx: HandlerContext<Tx>,
    run: (
      row: SagaRow | undefined,
      sagaCtx: SagaContext<Tx>,
    ) => Promise<{ kind: 'state'; state: S } | { kind: 'keep' } | { kind: 'outcome'; outcome: Outcome } | { kind: 'skip' }>,
  ): Promise<Outcome | void> => {
    if (typeof id !== 'string' || id.length === 0 || bytesOver(id, messageLimits.keyBytes) !== undefined) {
      throw new PermanentError(
        `Saga ${saga}: ${message.topic} message ${message.id} names no usable instance (its correlation gave ${JSON.stringify(id)?.slice(0, 80)}; a non-empty string of at most ${messageLimits.keyBytes} bytes)`,
      );
    }
    const row = await host.store.load(ctx.tx, saga, id);
    if (row?.completed === true) {
      stats.ignoredAfterCompletion++;
      return undefined;
    }
    let completed = false;
    const sagaCtx = new SagaDelivery<Tx>(ctx, id, row?.version ?? 0, timeouts, () => {
      completed = true;
    });
    const result = await run(row, sagaCtx);
    if (result.kind === 'skip') return undefined;
    if (result.kind === 'outcome') return result.outcome;
    const state = result.kind === 'state' ? checkState(definition, result.state, message) : row!.state;
    const saved = await host.store.save(
      ctx.tx,
      saga,
      id,
      { state, version: (row?.version ?? 0) + 1, completed },
      { messageId: message.id, topic: message.topic },
    );
    // Another transaction started this instance meanwhile: try again, on its state.
    if (!saved) throw new Error(`Saga ${saga}: instance ${id} was started by another message at the same time; this one is tried again on its state`);
    if (row === undefined) stats.started++;
    stats.transitions++;
    if (completed) stats.completed++;
    return undefined;
  };

  const handlers = Object.entries(definition.messages).map(([name, contract]) => ({
    contract,
    handler: (message: Message<unknown>, ctx: HandlerContext<Tx>) => {
      const id = definition.correlate[name as keyof M]!(message.data as never);
      return transition(id, message, ctx, async (row, sagaCtx) => {
        if (row === undefined) {
          const start = definition.start[name as keyof M];
          if (start !== undefined) return { kind: 'state', state: await start(message as never, sagaCtx) };
          if (early === 'retry') return { kind: 'outcome', outcome: retryLater(sagaDefaults.retryEarlyMs, `saga ${saga} instance ${id} has not started yet`) };
          stats.early++;
          if (early === 'ignore') return { kind: 'skip' };
          throw new PermanentError(`Saga ${saga}: instance ${id} has not started (no message that starts it came first)`);
        }
        const handle = definition.handle?.[name as keyof M];
        if (handle === undefined) return { kind: 'skip' };
        return toTransition(await handle(row.state as S, message as never, sagaCtx));
      });
    },
  }));
  handlers.push({
    contract: timeouts,
    handler: (message, ctx) => {
      const data = message.data as TimeoutData;
      return transition(data.id, message, ctx, async (row, sagaCtx) => {
        // A timeout of an instance that is gone (completed and removed) is counted as after completion.
        if (row === undefined) {
          stats.ignoredAfterCompletion++;
          return { kind: 'skip' };
        }
        const fire = definition.timeouts?.[data.name];
        if (fire === undefined) throw new PermanentError(`Saga ${saga} has no timeout ${JSON.stringify(data.name)}: add it to timeouts`);
        return toTransition(await fire(row.state as S, data.data, sagaCtx));
      });
    },
  });
  return handlers as never;
}

function toTransition<S>(value: Transition<S>): { kind: 'state'; state: S } | { kind: 'keep' } | { kind: 'outcome'; outcome: Outcome } {
  if (value === undefined || value === null) return { kind: 'keep' };
  if (isOutcome(value)) return { kind: 'outcome', outcome: value };
  return { kind: 'state', state: value as S };
}

function isOutcome(value: unknown): value is Outcome {
  return (
    typeof value === 'object' &&
    value !== null &&
    'kind' in value &&
    ((value as Outcome).kind === 'retry' || (value as Outcome).kind === 'dead-letter') &&
    'reason' in value
  );
}

/** A state that breaks the saga's schema is the transition's bug: the message goes to dead letters, naming the field. */
function checkState<S>(definition: SagaDefinition<S, Record<string, AnyContract>>, state: S, message: Message<unknown>): S {
  const result = definition.state['~standard'].validate(state);
  if (result instanceof Promise) throw new PermanentError(`Saga ${definition.name}: its state schema must validate synchronously`);
  if (result.issues !== undefined) {
    throw new ValidationError(
      `the state of saga ${definition.name}`,
      result.issues.map((issue) => ({ path: (issue.path ?? []).map((p) => String(typeof p === 'object' ? p.key : p)).join('.'), message: issue.message })),
      { id: message.id, topic: message.topic },
    );
  }
  return result.value;
}

/** A saga handler's context: the message's, with the saga's powers. */
class SagaDelivery<Tx> implements SagaContext<Tx> {
  constructor(
    private readonly inner: HandlerContext<Tx>,
    readonly sagaId: string,
    readonly version: number,
    private readonly timeouts: Contract<string, TimeoutData, TimeoutData>,
    private readonly completing: () => void,
  ) {}

  get subscription(): string {
    return this.inner.subscription;
  }

  get attempt(): number {
    return this.inner.attempt;
  }

  get tx(): Tx {
    return this.inner.tx;
  }

  get signal(): AbortSignal {
    return this.inner.signal;
  }

  get publish(): HandlerContext<Tx>['publish'] {
    return this.inner.publish;
  }

  async requestTimeout(name: string, delayMs: number, data?: unknown): Promise<void> {
    await this.inner.publish(this.timeouts, { id: this.sagaId, name, ...(data === undefined ? {} : { data }) }, { delayMs });
  }

  complete(): void {
    this.completing();
  }
}
