import type { SqlDriver } from '../connection/driver.ts';
import type { Notifier } from '../notifier.ts';

/**
 * The tenants whose delivery is suspended (`tidings tenants suspend`, ops/tenants.ts), as this process knows
 * them: read at start, again on the `!tenants` signal a suspend or resume sends, and every `refreshMs` in
 * case a notification was lost. A consumer holds a suspended tenant's messages (batch.ts, held.ts) instead
 * of handling them; a resume makes them due again. The signal reaches running workers within a round trip,
 * so a batch already read when a suspend commits may still handle that tenant's messages.
 */
export class SuspendedTenants {
  #tenants: ReadonlySet<string> = new Set();
  #timer: NodeJS.Timeout | undefined;
  #stopSignal: (() => void) | undefined;

  constructor(
    private readonly driver: Pick<SqlDriver, 'query'>,
    private readonly schema: string,
    private readonly refreshMs: number,
    private readonly warn: (message: string, error?: unknown) => void,
  ) {}

  has(tenant: string | null | undefined): boolean {
    return tenant !== null && tenant !== undefined && this.#tenants.has(tenant);
  }

  async start(notifier: Notifier): Promise<void> {
    await this.#load();
    this.#stopSignal = notifier.onSignal('tenants', () => {
      this.#load().catch((error: unknown) => this.warn('Could not read which tenants are suspended; trying again shortly', error));
    });
    this.#timer = setInterval(() => {
      this.#load().catch((error: unknown) => this.warn('Could not read which tenants are suspended; trying again shortly', error));
    }, this.refreshMs);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#stopSignal?.();
  }

  async #load(): Promise<void> {
    const { rows } = await this.driver.query<{ tenant: string }>(`select tenant from "${this.schema}".tenants where suspended_at is not null`);
    this.#tenants = new Set(rows.map((row) => row.tenant));
  }
}
