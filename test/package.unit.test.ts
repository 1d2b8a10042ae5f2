/**
 * What src/ imports, a user has: every package it names is a dependency or a peer dependency of Tidings
 * (or a node: builtin, or one of Tidings' own entries in package.json `exports`, which the CLI imports like
 * a user: `tidings/postgres`). One from devDependencies works here and breaks for users, silently for types
 * (message.data became any) or loudly at run time. The slow proof is tarball.smoke.test.ts; this is the
 * quick one, run with the unit tests.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as {
  name: string;
  exports: Record<string, unknown>;
  dependencies: Record<string, string>;
  peerDependencies: Record<string, string>;
};
const allowed = new Set([...Object.keys(pkg.dependencies), ...Object.keys(pkg.peerDependencies)]);
/** `tidings`, `tidings/postgres`, ...: the package's self-references, resolved through its own `exports`. */
const ownEntries = new Set(Object.keys(pkg.exports).map((key) => (key === '.' ? pkg.name : `${pkg.name}/${key.slice(2)}`)));

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    return entry.isDirectory() ? sources(path) : entry.name.endsWith('.ts') ? [path] : [];
  });
}

/** `pg`, `@electric-sql/pglite`, `nats/subpath` -> the package's name. */
function packageOf(specifier: string): string {
  const parts = specifier.split('/');
  return specifier.startsWith('@') ? `${parts[0]}/${parts[1]}` : parts[0]!;
}

test('src imports only dependencies, peer dependencies and node: builtins', () => {
  const wrong: string[] = [];
  for (const file of sources(join(root, 'src'))) {
    // Comments may name imports (`import('name')` in a doc comment): only code counts.
    const text = readFileSync(file, 'utf8')
      .replace(/\/\*[\s\S]*?\*\//g, '')
      .replace(/^\s*\/\/.*$/gm, '');
    for (const [, specifier] of text.matchAll(/(?:from|import)\s*\(?\s*'([^'.][^']*)'/g)) {
      if (specifier!.startsWith('node:') || allowed.has(packageOf(specifier!)) || ownEntries.has(specifier!)) continue;
      wrong.push(`${file.slice(root.length)} imports ${specifier}`);
    }
  }
  assert.deepEqual(wrong, [], 'add it to dependencies or peerDependencies, or (for types) copy them as src/core/standard-schema.ts does');
});
