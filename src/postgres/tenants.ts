/**
 * Tenant isolation enforced by PostgreSQL (docs/tenancy.md): with `tenancy: { isolation: 'rls' }`, every
 * transaction a consumer opens (the one its handlers' `ctx.tx` joins) runs on a connection logged in as a
 * restricted role, and row-level security (migration 013) confines each statement to the scope set for it:
 *
 * - `all`: the consumer's own statements (read, acknowledge, hold, dead-letter);
 * - `t:<tenant>`: a handler of that tenant's message (`t:` for a message without a tenant);
 * - `any`: a handler of a cross-tenant subscription (every tenant's rows, none of the consumer's tables).
 *
 * Why a restricted login and not `SET ROLE`: handler code could `RESET ROLE` back to a privileged session
 * user. Why a proof beside the scope: handler code can `set_config` any setting, so the scope counts only
 * with a keyed hash of itself, the transaction's id and the session's entry counter, under a key the
 * restricted role cannot read (`tenancy_key`). The consumer enters a scope through `tenancy_enter`
 * (migration 018) with a ticket only it can make; the function advances the counter, a sequence, which no
 * rollback undoes and the restricted role can neither advance nor read. So handler code can read the proof
 * of its own scope, which is useless to any other scope, in any other transaction, and after the next scope
 * is entered: a scope a `ROLLBACK TO` brings back from an earlier attempt proves nothing (issue 23). Each
 * attempt's scope is set before its savepoint, so `ROLLBACK TO SAVEPOINT tidings_attempt` lands in its
 * tenant's scope, not the consumer's. test/tenancy.pg.test.ts attacks all of it.
 */
import { createHash } from 'node:crypto';
import { TidingsError } from '../core/errors.ts';
import { type OptionProblems, optionNames, quotaProblems, type QuotaOptions } from '../core/options.ts';
import type { Queryable, SqlDriver } from './connection/driver.ts';
import { checkIdentifier } from './connection/identifiers.ts';
import { pgDriver } from './connection/pg.ts';
import { urlProblem } from './connection/url.ts';

export interface TenancyOptions {
  /**
   * `'rls'`: handlers' SQL through `ctx.tx` is confined by PostgreSQL to their message's tenant (row-level
   * security, on a connection logged in as `role`). `'none'`: the tenant travels with messages, and
   * nothing is enforced below the library.
   */
  isolation?: 'none' | 'rls';
  /** The restricted role consumers' transactions log in as (made, with LOGIN, at start if it is missing and the URL's user may). */
  role?: string;
  /** How to log in as `role`: by default the backbone's URL with `role` as its user and no password (trust or peer auth). */
  url?: string;
  /** Connections of the restricted role's pool. */
  poolSize?: number;
  /** Per-tenant publish rates, one budget per tenant for every process of the service (docs/tenancy.md, "Quotas"). */
  quotas?: QuotaOptions;
}

export const tenancyDefaults = {
  isolation: 'none',
  role: 'tidings_tenant',
  poolSize: 10,
} as const satisfies Required<Omit<TenancyOptions, 'url' | 'quotas'>>;

const tenancyOptionNames = optionNames<TenancyOptions>()('isolation', 'role', 'url', 'poolSize', 'quotas');

/** Adds what is wrong with `tenancy` to `problems`. */
export function tenancyProblems(problems: OptionProblems, tenancy: TenancyOptions | undefined, embedded: boolean): void {
  if (tenancy === undefined) return;
  problems.unknownKeys(tenancy, tenancyOptionNames, 'tenancy.');
  problems.oneOf('tenancy.isolation', tenancy.isolation, ['none', 'rls']);
  problems.integer('tenancy.poolSize', tenancy.poolSize, 1, 1_000);
  quotaProblems(problems, tenancy.quotas, 'tenancy.quotas.');
  if (tenancy.role !== undefined) {
    try {
      checkIdentifier('tenancy.role', tenancy.role);
    } catch (error) {
      problems.check(false, (error as Error).message);
    }
  }
  if (tenancy.url !== undefined) {
    const bad = urlProblem(tenancy.url);
    if (bad !== undefined) problems.check(false, `tenancy.url: ${bad}`);
  }
  problems.check(
    !(embedded && tenancy.isolation === 'rls'),
    "tenancy.isolation 'rls' needs a PostgreSQL server: embedded PostgreSQL (PGlite) has one user, which row-level security cannot confine",
  );
}

/** The tables a consumer's transaction touches; the restricted role gets these and nothing else. */
const CONSUMER_TABLES = ['log', 'scheduled', 'sagas', 'saga_transitions', 'replies', 'dead_letters', 'held', 'inbox', 'cursors', 'subscriptions', 'workers'];

/** What a consumer's scope of transactions can ask of isolation: open one, and set the scope in force. */
export interface Isolation {
  /** The driver a consumer opens its transactions with: the restricted role's, each in no scope (nothing visible) until one is entered. */
  readonly driver: Pick<SqlDriver, 'transaction'>;
  /**
   * Sets the scope of what runs next in `session`'s transaction: a tenant's, `any` (cross-tenant), or `all`.
   * The statement is sent at once; callers on a pipelining session need not wait for its answer.
   */
  enter(session: Queryable, scope: Scope): Promise<unknown>;
}

/** `all`, `any`, or a tenant's scope (`t:<tenant>`; `t:` for messages without a tenant). */
export type Scope = 'all' | 'any' | `t:${string}`;

/** The scope a handler of a message of `tenant` runs in. */
export function scopeOf(tenant: string | undefined, crossTenant: boolean): Scope {
  return crossTenant ? 'any' : `t:${tenant ?? ''}`;
}

export class TenantIsolation implements Isolation {
  #secret: Buffer | undefined;
  #restricted: SqlDriver | undefined;
  /** The transaction id of each open restricted transaction, which every proof in it is bound to. */
  readonly #xids = new WeakMap<object, string>();
  readonly driver: Pick<SqlDriver, 'transaction'>;

  constructor(
    private readonly schema: string,
    private readonly options: TenancyOptions & { readonly backboneUrl: string | undefined },
  ) {
    checkIdentifier('tenancy.role', options.role ?? tenancyDefaults.role);
    this.driver = {
      transaction: (fn, atCommit) =>
        this.#open().transaction(async (tx) => {
          const { rows } = await tx.query<{ xid: string }>('select pg_current_xact_id()::text as xid');
          this.#xids.set(tx, rows[0]!.xid);
          return fn(tx);
        }, atCommit),
    };
  }

  get role(): string {
    return this.options.role ?? tenancyDefaults.role;
  }

  /**
   * Prepares the database (run by the backbone's own, privileged connection): makes the restricted role if
   * it is missing, refuses one that would bypass row-level security, grants it the consumer's tables and
   * nothing else, lists it in `tenancy_roles`, and reads the key proofs are made with.
   */
  async prepare(db: Queryable): Promise<void> {
    const role = this.role;
    const s = `"${this.schema}"`;
    const { rows } = await db.query<{ bypasses: boolean }>('select rolsuper or rolbypassrls as bypasses from pg_roles where rolname = $1', [role]);
    if (rows.length === 0) {
      try {
        await db.query(`create role "${role}" login`);
      } catch (error) {
        // Another process made it meanwhile (42710, or 23505 when both inserted at once): that is what we wanted.
        const code = (error as { code?: string }).code;
        if (code !== '42710' && code !== '23505') {
          throw new TidingsError(
            'INVALID_OPTIONS',
            `tenancy: the role ${role} does not exist and could not be made (${(error as Error).message}); ask a DBA to run: create role ${role} login password '...'; then give its URL as tenancy.url`,
            { cause: error },
          );
        }
      }
    } else if (rows[0]!.bypasses) {
      throw new TidingsError(
        'INVALID_OPTIONS',
        `tenancy: the role ${role} is a superuser or bypasses row-level security, so it would confine nothing; give tenancy.role a role without SUPERUSER or BYPASSRLS`,
      );
    }
    await db.query(`grant usage on schema ${s} to "${role}"`);
    await db.query(`grant select, insert, update, delete on ${CONSUMER_TABLES.map((table) => `${s}.${table}`).join(', ')} to "${role}"`);
    await db.query(`insert into ${s}.tenancy_roles (role) values ($1) on conflict do nothing`, [role]);
    const { rows: key } = await db.query<{ secret: Buffer }>(`select secret from ${s}.tenancy_key`);
    this.#secret = key[0]!.secret;
  }

  enter(session: Queryable, scope: Scope): Promise<unknown> {
    const xid = this.#xids.get(session);
    if (xid === undefined || this.#secret === undefined) throw new Error('tenancy: a scope can be entered only in a transaction of the restricted role');
    // Parameters, never literals: pg_stat_activity shows a session's last statement text to every session of
    // the same role, so a ticket in the text would reach other handlers' SQL (their values are not shown).
    return session.query(`select "${this.schema}".tenancy_enter($1, $2)`, [scope, ticket(this.#secret, scope, xid)]);
  }

  async close(): Promise<void> {
    await this.#restricted?.close();
  }

  #open(): SqlDriver {
    if (this.#restricted === undefined) throw new Error('tenancy: not prepared; the backbone opens it');
    return this.#restricted;
  }

  /** Opens the restricted role's pool (after `prepare`). */
  async connect(name: string): Promise<void> {
    const url = this.options.url ?? restrictedUrl(this.options.backboneUrl, this.role);
    this.#restricted = await pgDriver({
      url,
      poolSize: this.options.poolSize ?? tenancyDefaults.poolSize,
      name: `${name}:tenants`,
      settingsFrom: 'tenancy.url',
    });
  }
}

/** The backbone's URL with the restricted role as its user and no password. */
function restrictedUrl(backboneUrl: string | undefined, role: string): string {
  if (backboneUrl === undefined) {
    throw new TidingsError('INVALID_OPTIONS', `tenancy: with your own pool, give tenancy.url: how to log in as ${role}`);
  }
  const url = new URL(backboneUrl);
  url.username = role;
  url.password = '';
  return url.toString();
}

/**
 * The ticket of `scope` in transaction `xid`, as migration 018's tenancy_enter() checks it before it sets the
 * scope with a proof bound to the session's entry counter: sha256(k || sha256(k || m)).
 */
function ticket(secret: Buffer, scope: string, xid: string): string {
  const inner = createHash('sha256').update(secret).update(`${scope}/${xid}`, 'utf8').digest();
  return createHash('sha256').update(secret).update(inner).digest('hex');
}
