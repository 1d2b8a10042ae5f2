/**
 * A backbone per tenant (backbone.ts): each tenant's messages in a stamp of their own (a schema, a database,
 * a vhost, a subject prefix), behind one backbone that routes by tenant. The folder: options.ts, backbone.ts,
 * stamp.ts (one tenant's backbone and its state), dead-letters.ts (every stamp's, named by tenant).
 */
import { TenantStamps } from './backbone.ts';
import type { TenantStampsOptions } from './options.ts';

export { TenantStamps, type StampListener } from './backbone.ts';
export { StampDeadLetters, type StampDeadLetter, type StampDeadLetterGroup, type StampDeadLetterSummary } from './dead-letters.ts';
export { tenantStampsDefaults, type TenantStampsOptions } from './options.ts';

/**
 * A backbone per tenant: `createBus({ service, backbone: tenantStamps({ tenants, backbone: (tenant) => postgres({ url, schema: `tidings_${tenant}` }) }) })`.
 * The bus's transaction type is the stamps' backbones'. docs/tenancy.md, "A backbone per tenant".
 */
export function tenantStamps<Tx>(options: TenantStampsOptions<Tx>): TenantStamps<Tx> {
  return new TenantStamps(options);
}
