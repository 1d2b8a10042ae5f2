/**
 * The differences between two JSON documents, as a person reads them: each added, removed or changed value
 * with its path (`/channels/orders.order-placed/messages/.../required`). `tidings asyncapi --check` prints
 * them when a committed document no longer matches the code or the registry.
 */
import { canonical } from './json.ts';

export interface Difference {
  readonly kind: 'added' | 'removed' | 'changed';
  readonly path: string;
  readonly before?: unknown;
  readonly after?: unknown;
}

/** What turns `before` into `after`; none when they mean the same (object keys in any order). Arrays compare as whole values. */
export function differences(before: unknown, after: unknown, path = ''): Difference[] {
  if (canonical(before) === canonical(after)) return [];
  if (!isObject(before) || !isObject(after)) return [{ kind: 'changed', path: path || '/', before, after }];
  const found: Difference[] = [];
  for (const key of Object.keys(before)) {
    const at = `${path}/${key}`;
    if (!(key in after)) found.push({ kind: 'removed', path: at, before: before[key] });
    else found.push(...differences(before[key], after[key], at));
  }
  for (const key of Object.keys(after)) {
    if (!(key in before)) found.push({ kind: 'added', path: `${path}/${key}`, after: after[key] });
  }
  return found;
}

/** One line per difference: `+` added, `-` removed, `~` changed, with the values cut to `width` characters. */
export function renderDifferences(found: readonly Difference[], width = 100): string {
  const shown = (value: unknown) => {
    const text = JSON.stringify(value) ?? 'undefined';
    return text.length <= width ? text : `${text.slice(0, width - 3)}...`;
  };
  return found
    .map((difference) => {
      if (difference.kind === 'added') return `  + ${difference.path}: ${shown(difference.after)}`;
      if (difference.kind === 'removed') return `  - ${difference.path}: ${shown(difference.before)}`;
      return `  ~ ${difference.path}: ${shown(difference.before)} -> ${shown(difference.after)}`;
    })
    .join('\n');
}

function isObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}
