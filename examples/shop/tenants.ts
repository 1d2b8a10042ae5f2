/**
 * The shop serves three tenants (docs/tenancy.md): acme is noisy (four times the orders of each other one),
 * globex is quiet, initech is suspended for a while (an unpaid invoice) and catches up when resumed. Orders
 * are placed inside `bus.withTenant(tenant, ...)`, so every message of an order's story carries its tenant:
 * the saga's commands and timeouts, the payments' answers, the shipments. `TenantMeter` is middleware that
 * counts what each tenant had handled, and how long its orders waited for billing.
 */
import type { Middleware } from 'tidings';
import { OrderPlaced } from './contracts.ts';

export const TENANTS = ['acme', 'globex', 'initech'] as const;
export type Tenant = (typeof TENANTS)[number];
/** The tenant the demo suspends, then resumes once the others are done. */
export const SUSPENDED: Tenant = 'initech';

/** Order `i`'s tenant: four of every six orders are acme's. */
export function tenantOf(i: number): Tenant {
  return i % 6 === 4 ? 'globex' : i % 6 === 5 ? 'initech' : 'acme';
}

export class TenantMeter {
  readonly #handled = new Map<string, number>();
  readonly #waits = new Map<string, number[]>();

  /** Counts each message handled by its tenant; for OrderPlaced, how long after it was placed billing handled it. */
  readonly middleware: Middleware = async (message, _ctx, next) => {
    const outcome = await next();
    const tenant = message.tenant ?? '(none)';
    this.#handled.set(tenant, (this.#handled.get(tenant) ?? 0) + 1);
    if (message.topic === OrderPlaced.topic) this.#waits.set(tenant, [...(this.#waits.get(tenant) ?? []), Date.now() - message.time.getTime()]);
    return outcome;
  };

  /** Per tenant: messages handled, orders billing has handled, and the p50 / p99 of their wait, in ms. */
  report(tenant: string): { handled: number; orders: number; p50: number; p99: number } {
    const waits = [...(this.#waits.get(tenant) ?? [])].sort((a, b) => a - b);
    const at = (q: number) => waits[Math.min(waits.length - 1, Math.floor(q * waits.length))] ?? 0;
    return { handled: this.#handled.get(tenant) ?? 0, orders: waits.length, p50: at(0.5), p99: at(0.99) };
  }
}
