/**
 * The dead letters of every stamp as one store, each named with its tenant. A dead letter's id is its stamp's
 * id prefixed with the tenant (`acme/42`), since two stamps (two databases) may number theirs alike; a message
 * id (a UUID, unique everywhere) is looked for in every stamp.
 */
import {
  groupDeadLetters,
  type DeadLetter,
  type DeadLetterActionRequest,
  type DeadLetterActionResult,
  type DeadLetterGroup,
  type DeadLetterSelection,
  type DeadLetterStore,
  type DeadLetterSummary,
} from '../core/dead-letters.ts';
import { errorMessage, TidingsError } from '../core/errors.ts';
import type { Stamp } from './stamp.ts';

/** A dead letter as the stamps list it: its id prefixed with its tenant, and the tenant named. */
export interface StampDeadLetterSummary extends DeadLetterSummary {
  readonly tenant: string;
}

export interface StampDeadLetter extends DeadLetter {
  readonly tenant: string;
}

export interface StampDeadLetterGroup extends DeadLetterGroup {
  readonly tenant: string;
}

type Limited = DeadLetterSelection & { readonly limit?: number | undefined };

export class StampDeadLetters implements DeadLetterStore {
  readonly #stamps: () => readonly Stamp<unknown>[];

  constructor(stamps: () => readonly Stamp<unknown>[]) {
    this.#stamps = stamps;
  }

  async list(selection: Limited): Promise<{ total: number; deadLetters: StampDeadLetterSummary[] }> {
    let total = 0;
    const deadLetters: StampDeadLetterSummary[] = [];
    for (const [stamp, own] of this.#split(selection)) {
      const listed = await this.#ask(stamp, (store) => store.list(own));
      total += listed.total;
      deadLetters.push(...listed.deadLetters.map((letter) => ({ ...letter, id: `${stamp.tenant}/${letter.id}`, tenant: stamp.tenant })));
    }
    deadLetters.sort((a, b) => a.deadAt.localeCompare(b.deadAt));
    return { total, deadLetters: selection.limit === undefined ? deadLetters : deadLetters.slice(0, selection.limit) };
  }

  async group(selection: Limited): Promise<StampDeadLetterGroup[]> {
    const groups: StampDeadLetterGroup[] = [];
    for (const [stamp, own] of this.#split(selection)) {
      const found = await this.#ask(stamp, async (store) => store.group?.(own) ?? groupDeadLetters((await store.list(own)).deadLetters, own.limit));
      groups.push(...found.map((group) => ({ ...group, tenant: stamp.tenant })));
    }
    groups.sort((a, b) => b.count - a.count);
    return selection.limit === undefined ? groups : groups.slice(0, selection.limit);
  }

  async show(id: string): Promise<StampDeadLetter[]> {
    const found: StampDeadLetter[] = [];
    for (const [stamp, own] of this.#split({ ids: [id] })) {
      for (const letter of await this.#ask(stamp, (store) => store.show(own.ids![0]!))) {
        found.push({ ...letter, id: `${stamp.tenant}/${letter.id}`, tenant: stamp.tenant });
      }
    }
    return found;
  }

  async count(selection: DeadLetterSelection): Promise<number> {
    let count = 0;
    for (const [stamp, own] of this.#split(selection)) count += await this.#ask(stamp, (store) => store.count(own));
    return count;
  }

  redrive(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return this.#act(request, (store, own) => store.redrive(own));
  }

  drop(request: DeadLetterActionRequest): Promise<DeadLetterActionResult> {
    return this.#act(request, (store, own) => store.drop(own));
  }

  /** Stamp by stamp, one after the other; progress counts over the stamps done so far. */
  async #act(
    request: DeadLetterActionRequest,
    apply: (store: DeadLetterStore, own: DeadLetterActionRequest) => Promise<DeadLetterActionResult>,
  ): Promise<DeadLetterActionResult> {
    const result = { matched: 0, count: 0, bySubscription: {} as Record<string, number>, messageIds: [] as string[], stopped: false };
    for (const [stamp, own] of this.#split(request)) {
      if (request.signal?.aborted === true) {
        result.stopped = true;
        break;
      }
      const before = { done: result.count, total: result.matched };
      const onProgress = request.onProgress;
      const done = await this.#ask(stamp, (store) =>
        apply(store, {
          ...own,
          onProgress: onProgress === undefined ? undefined : (p) => onProgress({ done: before.done + p.done, total: before.total + p.total }),
        }),
      );
      result.matched += done.matched;
      result.count += done.count;
      result.messageIds.push(...done.messageIds);
      for (const [subscription, count] of Object.entries(done.bySubscription)) {
        result.bySubscription[subscription] = (result.bySubscription[subscription] ?? 0) + count;
      }
      if (done.stopped) {
        result.stopped = true;
        break;
      }
    }
    return result;
  }

  /**
   * The stamps a selection concerns, each with its own part of it: ids prefixed with a tenant go to that
   * tenant's stamp (without the prefix), other ids (message ids) to every stamp. A selection that names ids
   * skips the stamps none of them can be in.
   */
  #split<S extends DeadLetterSelection>(selection: S): [Stamp<unknown>, S][] {
    const stamps = this.#stamps();
    if (selection.ids === undefined || selection.ids.length === 0) return stamps.map((stamp) => [stamp, selection]);
    const own = new Map<Stamp<unknown>, string[]>();
    const everywhere: string[] = [];
    for (const id of selection.ids) {
      // The longest tenant that prefixes the id: a tenant id may itself hold a slash.
      const stamp = stamps.filter((s) => id.startsWith(`${s.tenant}/`)).sort((a, b) => b.tenant.length - a.tenant.length)[0];
      if (stamp === undefined) everywhere.push(id);
      else own.set(stamp, [...(own.get(stamp) ?? []), id.slice(stamp.tenant.length + 1)]);
    }
    return stamps.flatMap((stamp): [Stamp<unknown>, S][] => {
      const ids = [...(own.get(stamp) ?? []), ...everywhere];
      return ids.length === 0 ? [] : [[stamp, { ...selection, ids }]];
    });
  }

  /** Runs `fn` on a stamp's store; a failure names the tenant, so an operator knows which stamp is down. */
  async #ask<T>(stamp: Stamp<unknown>, fn: (store: DeadLetterStore) => Promise<T>): Promise<T> {
    try {
      return await fn(stamp.backbone.deadLetters());
    } catch (error) {
      if (error instanceof TidingsError && error.code === 'INVALID_OPTIONS') throw error;
      throw new TidingsError(
        'BACKBONE_UNAVAILABLE',
        `The dead letters of tenant ${stamp.tenant}'s stamp could not be read or changed: ${errorMessage(error)}. The other stamps' are untouched by this failure; act on the others with backbone.stamp(tenant).deadLetters()`,
        { cause: error, retryable: true },
      );
    }
  }
}
