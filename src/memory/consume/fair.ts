import { shareCap, shareWeight, type TenantShares } from '../../core/backbone.ts';
import { Deque } from '../deque.ts';
import type { KeyLine } from './state.ts';

/**
 * A lane's ready keys, grouped by the tenant of their next message when the subscription shares its slots
 * between tenants (`tenantConcurrency`, `tenantWeights`), else all in one line (tenant ''). In order of
 * readiness within a group.
 */
export class ReadyKeys {
  /** Tenant '' (every key, unless fair): kept apart, so the usual case costs no map lookup. */
  readonly #plain = new Deque<KeyLine>();
  readonly #byTenant = new Map<string, Deque<KeyLine>>();
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(tenant: string, line: KeyLine): void {
    let lines = tenant === '' ? this.#plain : this.#byTenant.get(tenant);
    if (lines === undefined) this.#byTenant.set(tenant, (lines = new Deque()));
    lines.push(line);
    this.#length++;
  }

  /** The first ready key of `tenant`, or of the first tenant with one. */
  shift(tenant?: string): KeyLine | undefined {
    let lines: Deque<KeyLine> | undefined;
    let name = tenant;
    if (tenant === '' || (tenant === undefined && this.#plain.length > 0)) lines = this.#plain;
    else if (tenant !== undefined) lines = this.#byTenant.get(tenant);
    else [name, lines] = this.#byTenant.entries().next().value ?? [];
    const line = lines?.shift();
    if (line === undefined) return undefined;
    this.#length--;
    if (lines!.length === 0 && lines !== this.#plain) this.#byTenant.delete(name!);
    return line;
  }

  /** The tenants with a ready key. */
  *tenants(): IterableIterator<string> {
    if (this.#plain.length > 0) yield '';
    yield* this.#byTenant.keys();
  }
}

/**
 * A worker's handler slots shared between tenants, as PostgreSQL's batches share theirs (postgres/consume/
 * fair.ts; docs/tenancy.md, "Fair delivery"): the next key goes to the tenant that has started the fewest
 * for its weight, never to one with `perTenant x weight` keys in flight. A tenant that comes (back) starts
 * level with the tenants present, so it is not owed the turns it was not there for.
 */
export class TenantSlots {
  readonly #tenants = new Map<string, { running: number; started: number; weight: number }>();

  constructor(private readonly shares: TenantShares) {}

  /** How far behind its share `tenant` is (lower goes first), or undefined if it is at its cap. */
  priority(tenant: string): number | undefined {
    const state = this.#tenants.get(tenant);
    if (state === undefined) return this.#level();
    if (state.running >= shareCap(this.shares, state.weight)) return undefined;
    return state.started / state.weight;
  }

  started(tenant: string): void {
    let state = this.#tenants.get(tenant);
    if (state === undefined) {
      const weight = shareWeight(this.shares, tenant);
      this.#tenants.set(tenant, (state = { running: 0, started: this.#level() * weight, weight }));
    }
    state.running++;
    state.started += 1;
  }

  ended(tenant: string): void {
    const state = this.#tenants.get(tenant);
    if (state === undefined) return;
    state.running--;
    // A tenant with nothing in flight is forgotten (no memory per tenant ever seen); it comes back level.
    if (state.running === 0) this.#tenants.delete(tenant);
  }

  /** Where a tenant that comes starts: the fewest started of those present, for their weights. */
  #level(): number {
    let level: number | undefined;
    for (const state of this.#tenants.values()) level = Math.min(level ?? Number.POSITIVE_INFINITY, state.started / state.weight);
    return level ?? 0;
  }
}
