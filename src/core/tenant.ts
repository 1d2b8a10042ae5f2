/**
 * Tenancy in the core: which tenant a message belongs to, how it travels from a caller's scope into what it
 * publishes, and the checks that keep one tenant's work from leaking into another's. Every backbone carries
 * the tenant in the envelope (`tenant`); PostgreSQL also enforces it with row-level security
 * (postgres/tenants.ts). docs/tenancy.md tells the whole story.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { AnyContract } from './contract.ts';
import { TidingsError } from './errors.ts';
import { handlerScope, type HandlerScope } from './scope.ts';
import { bytesOver, messageLimits } from './limits.ts';

/**
 * What a tenant id may not hold: control characters (NUL among them, which PostgreSQL's text refuses),
 * quotes and backslashes. A tenant id lands in SQL settings, subject prefixes, export file names and log
 * lines; values travel as parameters everywhere, and an id that needs no quoting anywhere cannot be
 * misquoted anywhere either. Its length is held to `messageLimits.idBytes` like the other ids.
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: refusing control characters is the point
const HOSTILE = /[\u0000-\u001f\u007f-\u009f'"`\\]/;

/** Why `value` is not a tenant id, if it is not, with the code to refuse it by. */
export function tenantProblem(value: unknown): { readonly code: 'INVALID_TENANT' | 'LIMIT_EXCEEDED'; readonly message: string } | undefined {
  if (typeof value !== 'string') return { code: 'INVALID_TENANT', message: `tenant must be a string, got ${typeof value}` };
  const bytes = bytesOver(value, messageLimits.idBytes);
  if (bytes !== undefined) return { code: 'LIMIT_EXCEEDED', message: `tenant is ${bytes} bytes, over the limit of ${messageLimits.idBytes}` };
  if (value.length === 0 || value.trim() !== value || HOSTILE.test(value)) {
    return {
      code: 'INVALID_TENANT',
      message: `tenant ${JSON.stringify(value.slice(0, 60))} is not a tenant id: use no quotes, backslashes, control characters or surrounding spaces (for example "acme" or "org-42")`,
    };
  }
  return undefined;
}

/** Throws INVALID_TENANT (or LIMIT_EXCEEDED, for a tenant too long) if `tenant` is not a tenant id; returns it otherwise. */
export function checkTenant(tenant: unknown, where: string, topic?: string): string {
  const problem = tenantProblem(tenant);
  if (problem !== undefined) throw new TidingsError(problem.code, `${where}: ${problem.message}`, topic === undefined ? {} : { ref: { topic } });
  return tenant as string;
}

/** A `withTenant` scope: the tenant, and the handler it was entered in (none outside handlers). */
interface TenantScope {
  readonly tenant: string;
  readonly within: HandlerScope | undefined;
}

const tenantScope = new AsyncLocalStorage<TenantScope>();

/**
 * Runs `fn` for `tenant`: what it publishes (and what the handlers of those messages publish, and so on)
 * carries the tenant, unless a publish names another.
 */
export function runForTenant<T>(tenant: string, handler: HandlerScope | undefined, fn: () => T): T {
  checkTenant(tenant, 'withTenant');
  return tenantScope.run({ tenant, within: handler }, fn);
}

/**
 * The tenant `withTenant` set for the code running now, if any. A scope entered outside any handler does
 * not reach into handlers (a bus started inside `withTenant` would otherwise lend its tenant to every
 * message it handles): inside a handler only a scope entered in that handler counts.
 */
function scopedTenant(handler: HandlerScope | undefined): string | undefined {
  const scope = tenantScope.getStore();
  return scope !== undefined && scope.within === handler ? scope.tenant : undefined;
}

/**
 * The tenant of the code running now: a `withTenant` scope's (as `scopedTenant` counts it), else the tenant
 * of the message being handled. What a backbone that routes by tenant (tidings/stamps) opens a transaction for.
 */
export function currentTenant(): string | undefined {
  const handler = handlerScope.getStore();
  return scopedTenant(handler) ?? handler?.message.tenant;
}

interface TenantOfPublish {
  readonly contract: AnyContract;
  /** The tenant the caller named in the publish's options (a handler's `ctx.publish` names its message's). */
  readonly named: string | undefined;
  /** The handler this publish runs in, if any. */
  readonly handler: HandlerScope | undefined;
  /** The bus requires a tenant on every message (`createBus({ requireTenant: true })`). */
  readonly required: boolean;
}

/**
 * The tenant a publish carries: the one it names, else `withTenant`'s, else the handled message's. Refuses
 * (TENANT_REQUIRED) a message without one if its contract or the bus requires one, and (TENANT_FORBIDDEN) a
 * handler of one tenant's message publishing for another, unless its subscription is cross-tenant.
 */
export function tenantOfPublish({ contract, named, handler, required }: TenantOfPublish): string | undefined {
  if (named !== undefined) checkTenant(named, `Cannot publish ${contract.name}`, contract.topic);
  const tenant = named ?? scopedTenant(handler) ?? handler?.message.tenant;
  if (tenant === undefined && (required || contract.requireTenant === true)) {
    throw new TidingsError(
      'TENANT_REQUIRED',
      `Cannot publish ${contract.name}: ${contract.requireTenant === true ? 'the contract' : 'the bus'} requires a tenant; publish it with { tenant } or inside bus.withTenant(tenant, fn)`,
      { ref: { topic: contract.topic } },
    );
  }
  const own = handler?.message.tenant;
  if (own !== undefined && tenant !== own && handler?.crossTenant !== true) {
    throw new TidingsError(
      'TENANT_FORBIDDEN',
      `Cannot publish ${contract.name} for tenant ${tenant ?? '(none)'} while handling message ${handler!.message.id} of tenant ${own}: a handler publishes for its message's tenant only; subscribe with { crossTenant: true } to let it publish for others`,
      { ref: { id: handler!.message.id, topic: contract.topic } },
    );
  }
  return tenant;
}

/** Why a received message cannot be handled by a subscription, as far as its tenant goes; undefined if it can. */
export function receivedTenantProblem(tenant: string | undefined, subscription: string, requireTenant: boolean): string | undefined {
  if (tenant === undefined) {
    return requireTenant
      ? `Subscription ${subscription} requires a tenant and the message carries none: publish it with { tenant } or inside bus.withTenant(tenant, fn), then redrive it`
      : undefined;
  }
  return tenantProblem(tenant)?.message;
}
