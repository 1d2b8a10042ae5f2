/**
 * `import 'tidings'` loads no backbone code: a user of one backbone never loads another's modules (nor their
 * clients), and the root entry's `brokered()` reaches its PostgreSQL outbox only through the backbone object
 * it is given (PostgresBackbone.lazyTransaction, postgres/inbox.ts), not by importing postgres/ itself.
 * Each module is transpiled as tsx runs it (imports used only as types vanish), and the static imports of
 * the result are followed from src/index.ts; lazy `import()` of optional packages is not loading. No public
 * entry loads the `tidings` CLI, nor the packages only the CLI needs.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const src = fileURLToPath(new URL('../src/', import.meta.url));

/** The relative modules `file` loads when it runs: its static imports and re-exports that survive transpiling. */
function runtimeImports(file: string): string[] {
  return staticImports(file)
    .filter((specifier) => specifier.startsWith('.'))
    .map((specifier) => join(dirname(file), specifier));
}

/** Every module specifier `file` imports statically when it runs (relative or a package). */
function staticImports(file: string): string[] {
  const { outputText } = ts.transpileModule(readFileSync(file, 'utf8'), {
    compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
    fileName: file,
  });
  return [...outputText.matchAll(/^\s*(?:import\s*['"]([^'"]+)['"]|(?:import|export)\b[^;'"]*?\bfrom\s*['"]([^'"]+)['"])/gm)].map(
    ([, bare, named]) => (bare ?? named)!,
  );
}

function loadedFrom(entry: string): Set<string> {
  const loaded = new Set<string>();
  const pending = [entry];
  while (pending.length > 0) {
    const file = pending.pop()!;
    if (loaded.has(file)) continue;
    loaded.add(file);
    pending.push(...runtimeImports(file));
  }
  return loaded;
}

/** The folders that hold a backbone's code, or code only a backbone's user needs. */
const BACKBONES = ['postgres', 'rabbitmq', 'nats', 'memory', 'replica', 'cli'];

test("import 'tidings' loads no backbone's modules", () => {
  const loaded = [...loadedFrom(join(src, 'index.ts'))].map((file) => relative(src, file));
  assert.deepEqual(
    loaded.filter((file) => BACKBONES.includes(file.split('/')[0]!)),
    [],
  );
  assert.ok(loaded.includes('outbox/index.ts'), 'the walk follows re-exports (brokered)');
});

test("import 'tidings/stamps' loads no backbone's modules: each stamp's backbone is the user's", () => {
  const loaded = [...loadedFrom(join(src, 'stamps/index.ts'))].map((file) => relative(src, file));
  assert.deepEqual(
    loaded.filter((file) => BACKBONES.includes(file.split('/')[0]!)),
    [],
  );
  assert.ok(loaded.includes('stamps/backbone.ts'), loaded.join(', '));
});

test('the walk sees runtime imports: tidings/postgres loads its own folder', () => {
  const files = [...loadedFrom(join(src, 'postgres/index.ts'))].map((file) => relative(src, file));
  assert.ok(files.includes('postgres/lazy-transaction.ts'), files.join(', '));
  assert.ok(files.includes('postgres/codec.ts'), files.join(', '));
});

test('no public entry loads the CLI, nor commander or cli-progress: a library user never needs them', () => {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { exports: Record<string, string | Record<string, string>> };
  const entries = Object.values(pkg.exports).flatMap((target) =>
    typeof target === 'object' && target['tidings-source'] !== undefined ? [target['tidings-source']] : [],
  );
  assert.ok(entries.length >= 10, entries.join(', '));
  for (const entry of entries) {
    const loaded = [...loadedFrom(fileURLToPath(new URL(`../${entry}`, import.meta.url)))];
    assert.deepEqual(
      loaded.map((file) => relative(src, file)).filter((file) => file.startsWith('cli/')),
      [],
      `${entry} loads the CLI`,
    );
    const packages = new Set(loaded.flatMap((file) => staticImports(file).filter((specifier) => !specifier.startsWith('.'))));
    assert.deepEqual(
      [...packages].filter((name) => name === 'commander' || name === 'cli-progress'),
      [],
      `${entry} loads a package only the CLI needs`,
    );
  }
});
