/**
 * Lists the exports of src/ that nothing imports: not another module of src, test, bench or examples, and
 * not a public entry point (package.json `exports`, and the CLI's main). Each is a place to look, not a
 * verdict: most are a name used only in its own file (drop the `export`), a few are dead code. Re-exports
 * are judged at their declaration; an entry's `export *` counts as a use of everything it passes on.
 *
 *   node --import tsx scripts/unused-exports.ts
 */
import { readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const root = fileURLToPath(new URL('..', import.meta.url));
const config = ts.getParsedCommandLineOfConfigFile(
  join(root, 'tsconfig.json'),
  {},
  {
    ...ts.sys,
    onUnRecoverableConfigFileDiagnostic: (diagnostic) => {
      throw new Error(ts.flattenDiagnosticMessageText(diagnostic.messageText, '\n'));
    },
  },
)!;
const program = ts.createProgram(config.fileNames, config.options);
const checker = program.getTypeChecker();

const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: Record<string, string | Record<string, string>> };
const entries = new Set([join(root, 'src/cli/main.ts')]);
for (const target of Object.values(pkg.exports)) {
  if (typeof target === 'object' && target['tidings-source'] !== undefined) entries.add(join(root, target['tidings-source']));
}

/** A symbol as `file#name` of the declaration it finally stands for (through imports and re-exports). */
function declarationOf(symbol: ts.Symbol): string | undefined {
  const target = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol;
  const declaration = target.declarations?.[0];
  return declaration === undefined ? undefined : `${declaration.getSourceFile().fileName}#${target.name}`;
}

const used = new Set<string>();
const use = (symbol: ts.Symbol | undefined) => {
  const key = symbol === undefined ? undefined : declarationOf(symbol);
  if (key !== undefined) used.add(key);
};
const useModule = (module: ts.Symbol | undefined) => {
  if (module !== undefined) for (const symbol of checker.getExportsOfModule(module)) use(symbol);
};

const files = program.getSourceFiles().filter((file) => !file.isDeclarationFile && !file.fileName.includes('node_modules'));
for (const file of files) {
  if (entries.has(file.fileName)) useModule(checker.getSymbolAtLocation(file));
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node) && node.importClause !== undefined) {
      const clause = node.importClause;
      if (clause.name !== undefined) use(checker.getSymbolAtLocation(clause.name));
      const bindings = clause.namedBindings;
      if (bindings !== undefined && ts.isNamespaceImport(bindings)) useModule(checker.getSymbolAtLocation(node.moduleSpecifier));
      if (bindings !== undefined && ts.isNamedImports(bindings)) for (const element of bindings.elements) use(checker.getSymbolAtLocation(element.name));
    } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword && node.arguments[0] !== undefined) {
      useModule(checker.getSymbolAtLocation(node.arguments[0]));
    } else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument)) {
      useModule(checker.getSymbolAtLocation(node.argument.literal));
    }
    ts.forEachChild(node, visit);
  };
  visit(file);
}

const unused: string[] = [];
for (const file of files) {
  const path = relative(root, file.fileName);
  if (!path.startsWith('src/') || entries.has(file.fileName)) continue;
  const module = checker.getSymbolAtLocation(file);
  if (module === undefined) continue;
  for (const symbol of checker.getExportsOfModule(module)) {
    if (symbol.flags & ts.SymbolFlags.Alias) continue;
    const key = declarationOf(symbol);
    if (key !== undefined && !used.has(key)) unused.push(`${path}: ${symbol.name}`);
  }
}
console.log(unused.sort().join('\n'));
console.log(`${unused.length} exports nothing imports`);
