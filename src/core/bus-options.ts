/**
 * `createBus`'s options: what each means, every problem with them reported by name in one error, and what
 * the bus runs with once they are resolved (defaults from busDefaults in options.ts; the warning sink, clock
 * and telemetry made).
 */
import type { Backbone } from './backbone.ts';
import { checkPublishes } from './catalog.ts';
import { systemClock, type Clock } from './clock.ts';
import { MAX_NAME_LENGTH, type AnyContract } from './contract.ts';
import { busDefaults, OptionProblems, optionNames, resolveSubscribeOptions, type SubscribeOptions } from './options.ts';
import { defaultWarning } from './warnings.ts';
import { loggerWarning, type Logger } from '../telemetry/logger.ts';
import { checkTelemetryOptions, type TelemetryOptions } from '../telemetry/options.ts';
import { BusTelemetry } from '../telemetry/telemetry.ts';

export interface BusOptions<Tx> {
  /** This service's name: the CloudEvents `source` of what it publishes. */
  service: string;
  backbone: Backbone<Tx>;
  /** Largest `data` accepted at publish, in bytes of JSON (default 256 KiB). */
  maxPayloadBytes?: number;
  /** Defaults for every subscription of this bus; each `subscribe` may override them. */
  subscriptionDefaults?: SubscribeOptions;
  /** Called with what the bus recovers from by itself (a schedule's tick that could not be published); the logger's warn, else the console, by default. */
  onWarning?: (message: string, error?: unknown) => void;
  /**
   * A pino-style logger (`logger.warn(record, message)`): structured lines with the message id, topic,
   * subscription and attempt for each retry, dead letter and invalid message, and the bus's warnings.
   */
  logger?: Logger;
  /** OpenTelemetry traces and metrics (docs/observability.md): on when `@opentelemetry/api` is installed; `false` turns them off. */
  telemetry?: TelemetryOptions | false;
  /** The clock of scheduled publishes, schedules' ticks and request timeouts: the system's, or a virtual one (tidings/testing). */
  clock?: Clock;
  /** The contracts this service publishes or sends: its `send` operations in AsyncAPI and in the registry (docs/contracts.md). */
  publishes?: readonly AnyContract[];
  /** Every message this bus publishes must carry a tenant: one without fails with TENANT_REQUIRED (docs/tenancy.md). */
  requireTenant?: boolean;
  /**
   * How long `bus.stop()` lets the handlers in flight finish before it aborts their `ctx.signal` with a
   * STOPPED error (default 10 s): a handler that watches the signal then ends, and its message is delivered
   * again later, to this service's next worker. Handlers still finish or time out (`timeoutMs`) after it.
   */
  stopGraceMs?: number;
}

/** A bus's options once checked, with their defaults. */
interface BusSettings<Tx> {
  readonly service: string;
  readonly backbone: Backbone<Tx>;
  readonly maxPayloadBytes: number;
  readonly subscriptionDefaults: SubscribeOptions;
  readonly warn: (message: string, error?: unknown) => void;
  readonly clock: Clock;
  readonly telemetry: BusTelemetry;
  readonly publishes: readonly AnyContract[];
  readonly requireTenant: boolean;
  readonly stopGraceMs: number;
}

const busOptionNames = optionNames<BusOptions<unknown>>()(
  'service',
  'backbone',
  'maxPayloadBytes',
  'subscriptionDefaults',
  'onWarning',
  'clock',
  'publishes',
  'logger',
  'telemetry',
  'requireTenant',
  'stopGraceMs',
);

/** Letters, digits and the other characters a URI authority takes unescaped. */
const SERVICE = new RegExp(`^[A-Za-z0-9._~-]{1,${MAX_NAME_LENGTH}}$`);

/** Checks `options` (INVALID_OPTIONS naming every problem) and resolves them. */
export function busSettings<Tx>(options: BusOptions<Tx>): BusSettings<Tx> {
  const problems = new OptionProblems('createBus');
  problems.unknownKeys(options, busOptionNames);
  problems.check(
    typeof options?.service === 'string' && SERVICE.test(options.service),
    `service ${JSON.stringify(options?.service)} must be a name of letters, digits, ".", "-", "_" or "~" (at most ${MAX_NAME_LENGTH} characters, for example "billing-service"): it becomes the CloudEvents source URI tidings://<service>`,
  );
  problems.check(options?.backbone !== undefined && typeof options.backbone.publish === 'function', 'backbone is required, for example postgres({ url })');
  problems.integer('maxPayloadBytes', options?.maxPayloadBytes, 1);
  checkTelemetryOptions(problems, options?.telemetry, options?.logger);
  problems.oneOf('requireTenant', options?.requireTenant, [true, false]);
  problems.integer('stopGraceMs', options?.stopGraceMs, 0, 3_600_000);
  problems.throwIfAny();
  const publishes = checkPublishes(options.publishes);
  const subscriptionDefaults = options.subscriptionDefaults ?? {};
  resolveSubscribeOptions('createBus subscriptionDefaults', subscriptionDefaults);
  const warn = options.onWarning ?? (options.logger === undefined ? defaultWarning : loggerWarning(options.logger));
  return {
    service: options.service,
    backbone: options.backbone,
    maxPayloadBytes: options.maxPayloadBytes ?? busDefaults.maxPayloadBytes,
    subscriptionDefaults,
    warn,
    clock: options.clock ?? systemClock,
    telemetry: new BusTelemetry({ backbone: options.backbone as Backbone<unknown>, telemetry: options.telemetry, logger: options.logger, warn }),
    publishes,
    requireTenant: options.requireTenant ?? busDefaults.requireTenant,
    stopGraceMs: options.stopGraceMs ?? busDefaults.stopGraceMs,
  };
}
