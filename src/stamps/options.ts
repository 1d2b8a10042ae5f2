/** The options of a backbone per tenant (tenantStamps), their defaults, and their validation. */
import type { Backbone } from '../core/backbone.ts';
import { OptionProblems, optionNames } from '../core/options.ts';
import { tenantProblem } from '../core/tenant.ts';
import { defaultWarning } from '../core/warnings.ts';

export interface TenantStampsOptions<Tx> {
  /**
   * The tenants served at start: a list, or a function that reads them (from a registry, a config service)
   * when the backbone opens. Add one later with `addTenant`.
   */
  tenants: readonly string[] | (() => readonly string[] | Promise<readonly string[]>);
  /**
   * Makes the backbone of one tenant's stamp: its own schema, database, vhost or subject prefix. Called once
   * per tenant before the stamp opens, and again each time it could not open (the next try starts afresh);
   * the backbones must be of one kind (one transaction type).
   */
  backbone: (tenant: string) => Backbone<Tx>;
  /** How long to wait before opening again a stamp that could not open (its tenant alone waits meanwhile). */
  reopenMs?: number;
  /**
   * What `bus.health()`'s readiness asks of the stamps: `'any'`, ready while one stamp passes all its checks
   * (a failing stamp's checks are listed, not counted: taking the process out of service would hold up every
   * tenant for one); `'every'`, ready only when every stamp is.
   */
  readiness?: 'any' | 'every';
  /** Called with what the stamps recover from by themselves: a stamp that could not open, and is tried again. */
  onWarning?: (message: string, error?: unknown) => void;
}

export const tenantStampsDefaults = {
  reopenMs: 5_000,
  readiness: 'any',
} as const satisfies Required<Omit<TenantStampsOptions<unknown>, 'tenants' | 'backbone' | 'onWarning'>>;

/** The options resolved: every default applied. */
export interface TenantStampsSettings<Tx> {
  readonly tenants: () => Promise<readonly string[]>;
  readonly backbone: (tenant: string) => Backbone<Tx>;
  readonly reopenMs: number;
  readonly readiness: 'any' | 'every';
  readonly warn: (message: string, error?: unknown) => void;
}

/** Checks every option (OptionProblems names each bad one) and applies the defaults. */
export function resolveTenantStampsOptions<Tx>(options: TenantStampsOptions<Tx>): TenantStampsSettings<Tx> {
  const problems = new OptionProblems('tenantStamps()');
  problems.unknownKeys(options, optionNames<TenantStampsOptions<Tx>>()('tenants', 'backbone', 'reopenMs', 'readiness', 'onWarning'));
  const { tenants } = options;
  problems.check(
    Array.isArray(tenants) || typeof tenants === 'function',
    "tenants must be a list of tenant ids (['acme', 'globex']) or a function that returns them",
  );
  problems.check(
    typeof options.backbone === 'function',
    'backbone must be a function (tenant) => backbone, for example (tenant) => postgres({ url, schema: "tidings_" + tenant })',
  );
  problems.integer('reopenMs', options.reopenMs, 1);
  problems.oneOf('readiness', options.readiness, ['any', 'every']);
  problems.check(options.onWarning === undefined || typeof options.onWarning === 'function', 'onWarning must be a function (message, error) => void');
  if (Array.isArray(tenants)) {
    for (const tenant of tenants) {
      const problem = tenantProblem(tenant);
      problems.check(problem === undefined, `tenants: ${problem?.message}`);
    }
    problems.check(new Set(tenants).size === tenants.length, 'tenants lists a tenant twice: each tenant has one stamp');
  }
  problems.throwIfAny();
  return {
    tenants: Array.isArray(tenants) ? async () => tenants : async () => await (tenants as () => readonly string[] | Promise<readonly string[]>)(),
    backbone: options.backbone,
    reopenMs: options.reopenMs ?? tenantStampsDefaults.reopenMs,
    readiness: options.readiness ?? tenantStampsDefaults.readiness,
    warn: options.onWarning ?? defaultWarning,
  };
}
