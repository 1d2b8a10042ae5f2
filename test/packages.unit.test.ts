/**
 * A package a backbone needs (pg, PGlite, amqplib, nats) is either missing, or installed and failing to
 * load: the error says which, names the package and what to do.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { TidingsError } from '../src/index.ts';
import { loadPackage } from '../src/core/packages.ts';

async function failure(loading: Promise<unknown>, name: string): Promise<TidingsError> {
  const error = await loadPackage(loading, name, 'The test backbone').then(
    () => assert.fail('expected the load to fail'),
    (caught: unknown) => caught,
  );
  assert.ok(error instanceof TidingsError);
  assert.equal(error.code, 'PACKAGE_UNAVAILABLE');
  assert.equal(error.retryable, false);
  return error;
}

test('a package that is not installed: named, with the install command', async () => {
  const error = await failure(import('tidings-test-no-such-package' as string), 'tidings-test-no-such-package');
  assert.equal(
    error.message,
    'The test backbone needs the "tidings-test-no-such-package" package, which is not installed: npm install tidings-test-no-such-package',
  );
});

test('a package that is installed but fails to load: named, with its own error, not "npm install" alone', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidings-broken-'));
  try {
    // Installed, but one of its own dependencies is missing: Node's "Cannot find package" names the other one.
    mkdirSync(join(dir, 'node_modules', 'broken'), { recursive: true });
    writeFileSync(join(dir, 'node_modules', 'broken', 'package.json'), JSON.stringify({ name: 'broken', type: 'module', main: 'index.js' }));
    writeFileSync(join(dir, 'node_modules', 'broken', 'index.js'), "import 'its-missing-dependency';\n");
    writeFileSync(join(dir, 'entry.js'), "export * from 'broken';\n");
    const missingDependency = await failure(import(pathToFileURL(join(dir, 'entry.js')).href), 'broken');
    assert.match(
      missingDependency.message,
      /needs the "broken" package: it is installed but failed to load \(Cannot find (package|module) 'its-missing-dependency'/,
    );
    assert.match(missingDependency.message, /Reinstall it \(npm install broken\)/);

    writeFileSync(join(dir, 'thrower.js'), "throw new Error('this build of the driver needs a newer Node');\n");
    const throws = await failure(import(pathToFileURL(join(dir, 'thrower.js')).href), 'broken');
    assert.match(throws.message, /installed but failed to load \(this build of the driver needs a newer Node\)/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
