#!/usr/bin/env node
// The `tidings` command. Runs the compiled CLI when the package is built (dist/), else the TypeScript
// sources through tsx, which is how it runs inside this repository.
import { existsSync } from 'node:fs';
import { register as registerHooks } from 'node:module';

const built = new URL('../dist/cli/main.js', import.meta.url);
if (existsSync(built)) {
  await import(built.href);
} else {
  const { register } = await import('tsx/esm/api').catch(() => {
    process.stderr.write('tidings: this copy has no compiled dist/ and tsx is not installed: run "npm run build" (or "npm install" for tsx)\n');
    process.exit(1);
  });
  register();
  // The CLI imports the package's own entries (tidings/postgres, ...): from the sources, they must resolve to
  // src/ as under --conditions=tidings-source, not to the dist/ this copy does not have.
  registerHooks(
    `data:text/javascript,${encodeURIComponent(
      'export function resolve(specifier, context, next) { return next(specifier, { ...context, conditions: [...context.conditions, "tidings-source"] }); }',
    )}`,
  );
  await import(new URL('../src/cli/main.ts', import.meta.url).href);
}
