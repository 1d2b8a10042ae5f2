/**
 * The published declarations never name `@opentelemetry/*`: those are optional peer dependencies, and a user
 * who type-checks libraries (`skipLibCheck: false`) without them installed would get errors from Tidings'
 * .d.ts files. The declarations are built as `npm run build` builds them (tsconfig.build.json, into a
 * temporary folder), then every declaration file reachable from an entry of package.json `exports` is
 * walked: its imports, re-exports, `import("...")` types and `/// <reference types>`. The code that needs
 * the API's types (telemetry/tracing.ts, metrics.ts, otel.ts) stays behind private members of BusTelemetry;
 * the options take Tidings' structural types (TracerProviderLike, MeterProviderLike). No entry is exempt:
 * even `tidings/metrics` hands out its meter provider as a MeterProviderLike. The slow proof is
 * tarball.smoke.test.ts's skipLibCheck-false pass, on an app with no OpenTelemetry package installed.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const root = fileURLToPath(new URL('..', import.meta.url));
const out = mkdtempSync(join(tmpdir(), 'tidings-declarations-'));
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: Record<string, string | { types?: string }> };
/** What the declarations must not import: optional peers, absent from many users' installs. */
const FORBIDDEN = /^@opentelemetry\//;

before(() => {
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json'), '--outDir', out, '--emitDeclarationOnly'], { stdio: 'pipe' });
});

after(() => rmSync(out, { recursive: true, force: true }));

/** Every module a declaration file names: imports, re-exports, `import("...")` types, `/// <reference types>`. */
function specifiers(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const source = ts.createSourceFile(file, text, ts.ScriptTarget.ES2022, true);
  const found = ts.preProcessFile(text, true, true).typeReferenceDirectives.map((reference) => reference.fileName);
  const visit = (node: ts.Node): void => {
    if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier !== undefined) {
      found.push((node.moduleSpecifier as ts.StringLiteral).text);
    } else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument) && ts.isStringLiteral(node.argument.literal)) {
      found.push(node.argument.literal.text);
    } else if (ts.isImportEqualsDeclaration(node) && ts.isExternalModuleReference(node.moduleReference)) {
      found.push((node.moduleReference.expression as ts.StringLiteral).text);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return found;
}

/** The declaration file a relative specifier of `from` names (`./x.ts` and `./x.js` are `./x.d.ts`). */
function declarationOf(from: string, specifier: string): string {
  const path = join(dirname(from), specifier.replace(/\.(?:ts|js)$/, ''));
  return existsSync(`${path}.d.ts`) ? `${path}.d.ts` : join(path, 'index.d.ts');
}

/** Every declaration file `entry` reaches, with the chain of files that leads to it. */
function reachable(entry: string): Map<string, string[]> {
  const chains = new Map<string, string[]>();
  const pending: Array<{ file: string; chain: string[] }> = [{ file: entry, chain: [relative(out, entry)] }];
  while (pending.length > 0) {
    const { file, chain } = pending.pop()!;
    if (chains.has(file)) continue;
    chains.set(file, chain);
    assert.ok(existsSync(file), `${chain.join(' -> ')}: the declaration file is missing`);
    for (const specifier of specifiers(file).filter((name) => name.startsWith('.'))) {
      const next = declarationOf(file, specifier);
      pending.push({ file: next, chain: [...chain, relative(out, next)] });
    }
  }
  return chains;
}

/** The forbidden imports reachable from `entry`, each with the chain of files that leads to it. */
function forbiddenFrom(entry: string): string[] {
  return [...reachable(entry)].flatMap(([file, chain]) =>
    specifiers(file)
      .filter((specifier) => FORBIDDEN.test(specifier))
      .map((specifier) => `${chain.join(' -> ')} imports '${specifier}'`),
  );
}

/** `./dist/postgres/index.d.ts` -> the same file in the temporary build. */
function built(types: string): string {
  return join(out, relative('dist', types));
}

const entries = Object.entries(pkg.exports).flatMap(([name, target]) =>
  typeof target === 'object' && target.types !== undefined ? [{ name, types: built(target.types) }] : [],
);

test('no declaration reachable from a package entry imports an @opentelemetry package', () => {
  assert.ok(entries.length >= 10, `package.json exports lists the entries (${entries.map((entry) => entry.name).join(', ')})`);
  const problems = entries.flatMap((entry) => forbiddenFrom(entry.types).map((problem) => `${entry.name}: ${problem}`));
  assert.deepEqual(problems, [], `Declare these with Tidings' own types (telemetry/options.ts, observer.ts) or keep them private:\n${problems.join('\n')}`);
});

test('the walk sees what it looks for: the bus reaches its telemetry, and the tracing code (kept private) names the API', () => {
  const fromRoot = reachable(entries.find((entry) => entry.name === '.')!.types);
  assert.ok(fromRoot.has(join(out, 'telemetry', 'telemetry.d.ts')), 'the root entry reaches telemetry/telemetry.d.ts');
  assert.ok(fromRoot.has(join(out, 'telemetry', 'options.d.ts')), 'the root entry reaches telemetry/options.d.ts');
  const tracing = forbiddenFrom(join(out, 'telemetry', 'tracing.d.ts'));
  assert.ok(
    tracing.some((problem) => problem.endsWith("imports '@opentelemetry/api'")),
    `telemetry/tracing.d.ts imports @opentelemetry/api, and the check sees it: ${tracing.join('; ')}`,
  );
});
