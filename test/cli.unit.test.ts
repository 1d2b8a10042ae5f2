/**
 * The CLI's rendering and settings, without a database: compact status, terminal width, colour, replica
 * plumbing folded; TIDINGS_SCHEMA and the config file. And its shape: no import circle, and the package's
 * public entries rather than its internals.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { everyStamp, oneStamp, resolveGlobals } from '../src/cli/config.ts';
import { coloured, plain, styleFor } from '../src/cli/format.ts';
import { renderStatus } from '../src/cli/status.ts';
import type { PartitionStatus, Status, SubscriptionStatus, WorkerStatus } from '../src/postgres/index.ts';

const worker: WorkerStatus = {
  id: 'w-1',
  subscription: 'billing.charge-orders',
  host: 'h',
  pid: 1,
  startedAt: '2026-01-01T00:00:00Z',
  expiresAt: '2026-01-01T00:01:00Z',
  live: true,
  topics: ['orders.order-placed'],
};

function cursor(partition: number, lag: number, leaseRemainingMs = 5_000): PartitionStatus {
  return {
    partition,
    owner: 'w-1',
    epoch: 3,
    leaseExpiresAt: null,
    leaseRemainingMs,
    handled: 10,
    lag,
    oldestUnprocessedAgeMs: lag > 0 ? 1_500 : null,
    updatedAt: '2026-01-01T00:00:00Z',
    readApart: [],
  };
}

function subscription(name: string, lag: number, extra: Partial<SubscriptionStatus> = {}): SubscriptionStatus {
  return {
    name,
    topics: ['orders.order-placed', 'orders.order-cancelled', 'orders.order-amended-by-the-customer'],
    partitions: 4,
    handled: 40,
    lag,
    oldestUnprocessedAgeMs: lag > 0 ? 1_500 : null,
    heldKeys: 0,
    heldMessages: 0,
    deadLetters: 0,
    cursors: [cursor(0, lag), cursor(1, 0), cursor(2, 0), cursor(3, 0)],
    readApart: [],
    workers: [worker],
    disagreements: [],
    ...extra,
  };
}

const status: Status = {
  schema: 'shop',
  at: '2026-01-01T00:00:00Z',
  subscriptions: [
    subscription('billing.charge-orders', 7, { readApart: ['acme'] }),
    subscription('shipping.ship-paid-orders', 0, { heldKeys: 1, heldMessages: 2, deadLetters: 1 }),
    subscription('replica.credentials-gw1.replies', 0),
    subscription('replica-source.identity.users', 0),
  ],
  workers: [worker],
  heldKeys: 1,
  deadLetters: 1,
};

test('status is compact: detail only where something needs a look, replica plumbing folded into a line', () => {
  const text = renderStatus(status, 'postgres://db/shop', { verbose: false, width: undefined, style: plain });
  assert.match(text, /\nbilling\.charge-orders: 4 partitions; 1 of 4 partitions behind\n +PARTITION[^\n]*\n +0 +w-1 +5\.0 s left +3 +10 +7 +1\.5 s\n/);
  assert.equal(text.match(/s left/g)?.length, 1, 'the caught-up partitions are not listed');
  assert.match(text, /\nshipping\.ship-paid-orders: 4 partitions; 1 key held for a retry \(2 messages\)\n/);
  assert.match(text, /\(and 2 replica request\/reply subscriptions, all caught up, 80 handled: --verbose shows them\)/);
  assert.doesNotMatch(text, /replica\.credentials-gw1\.replies/);
  assert.match(text, /\nbilling\.charge-orders: read apart by fair delivery \(more than their share of a read\): acme\n/);
  assert.equal(text.match(/read apart/g)?.length, 1, 'only where a tenant is');
  assert.match(text, /1 dead letter: tidings dead-letters list --group/);
  const verbose = renderStatus(status, 'postgres://db/shop', { verbose: true, width: undefined, style: plain });
  assert.match(verbose, /replica\.credentials-gw1\.replies/);
  assert.equal(verbose.match(/s left/g)?.length, 16);
});

test('status fits the terminal: long columns are cut, none is wider than the width', () => {
  const text = renderStatus(status, 'postgres://db/shop', { verbose: false, width: 100, style: plain });
  const table = text.split('\n').filter((line) => /^SUBSCRIPTION|^\S+ +orders\./.test(line));
  assert.equal(table.length, 3);
  for (const line of table) assert.ok(line.length <= 100, `${line.length}: ${line}`);
  assert.match(text, /\nshipping\.ship-paid-orders +orders\.order-pla…/, 'the topics give way first, the names stay whole');
});

test('colour on a terminal only, and never with NO_COLOR', () => {
  assert.equal(styleFor(true, {}), coloured);
  assert.equal(styleFor(false, {}), plain);
  assert.equal(styleFor(true, { NO_COLOR: '1' }), plain);
  assert.equal(styleFor(false, { FORCE_COLOR: '1' }), coloured);
  const text = renderStatus(status, 'postgres://db/shop', { verbose: false, width: undefined, style: coloured });
  // biome-ignore lint/suspicious/noControlCharactersInRegex: the escape codes are what this test checks
  assert.match(text, /\x1b\[33m +7\x1b\[0m/, 'lag in yellow');
  // biome-ignore lint/suspicious/noControlCharactersInRegex: the escape codes are what this test checks
  assert.match(text, /\x1b\[31m +1\x1b\[0m/, 'dead letters in red');
});

test('settings: the command line, then TIDINGS_SCHEMA and DATABASE_URL, then tidings.config.json (here or above), then defaults', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidings-config-'));
  try {
    assert.equal(resolveGlobals({}, {}, dir).schema, 'tidings');
    writeFileSync(join(dir, 'tidings.config.json'), JSON.stringify({ schema: 'from_file', url: 'postgres://file/db', connectTimeout: 3 }));
    mkdirSync(join(dir, 'service', 'src'), { recursive: true });
    const below = resolveGlobals({}, {}, join(dir, 'service', 'src'));
    assert.deepEqual(
      [below.schema, below.url, below.connectTimeout, below.configFile],
      ['from_file', 'postgres://file/db', 3, join(dir, 'tidings.config.json')],
    );
    const env = resolveGlobals({}, { TIDINGS_SCHEMA: 'from_env', DATABASE_URL: 'postgres://env/db' }, dir);
    assert.deepEqual([env.schema, env.url], ['from_env', 'postgres://env/db']);
    const flags = resolveGlobals({ schema: 'from_flag', url: 'postgres://flag/db' }, { TIDINGS_SCHEMA: 'from_env' }, dir);
    assert.deepEqual([flags.schema, flags.url], ['from_flag', 'postgres://flag/db']);

    writeFileSync(join(dir, 'tidings.config.json'), JSON.stringify({ shema: 'x', connectTimeout: 'soon' }));
    assert.throws(
      () => resolveGlobals({}, {}, dir),
      /tidings\.config\.json: shema is not a setting \(the settings are url, schema, connectTimeout, prefix, stream, stamps\); connectTimeout must be a number/,
    );
    rmSync(join(dir, 'tidings.config.json'));
    assert.throws(() => resolveGlobals({}, { TIDINGS_SCHEMA: 'Bad-Name' }, dir), /TIDINGS_SCHEMA "Bad-Name" is invalid/);
    assert.throws(() => resolveGlobals({ config: 'nope.json' }, {}, dir), /--config nope\.json: no such file/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

const CLI = fileURLToPath(new URL('../src/cli/', import.meta.url));

/** The modules each file of src/cli imports (statically, or with `import()`), as written. */
function cliImports(): Map<string, string[]> {
  const imports = new Map<string, string[]>();
  for (const file of readdirSync(CLI, { recursive: true, encoding: 'utf8' }).filter((name) => name.endsWith('.ts'))) {
    const text = readFileSync(join(CLI, file), 'utf8');
    imports.set(
      file,
      [...text.matchAll(/\bfrom\s*'([^']+)'|\bimport\s*\(\s*'([^']+)'\s*\)|^import\s*'([^']+)'/gm)].map(
        ([, from, dynamic, bare]) => (from ?? dynamic ?? bare)!,
      ),
    );
  }
  return imports;
}

test('the CLI has no import circle: program.ts registers the commands, and no command imports another', () => {
  const imports = cliImports();
  const graph = new Map([...imports].map(([file, specifiers]) => [file, specifiers.filter((s) => s.startsWith('.')).map((s) => join(dirname(file), s))]));
  const done = new Set<string>();
  const visit = (file: string, path: string[]): void => {
    const at = path.indexOf(file);
    assert.equal(at, -1, `import circle: ${[...path.slice(at), file].join(' -> ')}`);
    if (done.has(file)) return;
    for (const next of graph.get(file) ?? []) visit(next, [...path, file]);
    done.add(file);
  };
  for (const file of graph.keys()) visit(file, []);
  for (const [file, targets] of graph) {
    if (!file.startsWith('commands/')) continue;
    assert.deepEqual(
      targets.filter((target) => target.startsWith('commands/') || target === 'program.ts'),
      [],
      `${file} imports another command or the program`,
    );
  }
});

test("the CLI imports the package's public entries (tidings, tidings/postgres, ...), its own files and node:, not the library's internals", () => {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { exports: Record<string, unknown> };
  const entries = new Set(Object.keys(pkg.exports).map((key) => (key === '.' ? 'tidings' : `tidings/${key.slice(2)}`)));
  const packages = new Set(['commander', 'cli-progress', 'pg']);
  for (const [file, specifiers] of cliImports()) {
    for (const specifier of specifiers) {
      if (specifier.startsWith('.')) {
        const target = relative(CLI, join(CLI, dirname(file), specifier));
        // internals.ts is the one door into the library's own files, and says why.
        const inside =
          !target.startsWith('..') || (file === 'internals.ts' && (target === '../core/packages.ts' || target.startsWith('../postgres/connection/')));
        assert.ok(inside, `${file} imports ${specifier}, inside the library: import it from a public entry (${[...entries].join(', ')})`);
      } else {
        assert.ok(specifier.startsWith('node:') || entries.has(specifier) || packages.has(specifier), `${file} imports ${specifier}`);
      }
    }
  }
});

test('stamps in the config file: each completed from the global settings, --stamp narrows, bad ones are named by field', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tidings-stamps-'));
  const file = join(dir, 'tidings.config.json');
  try {
    writeFileSync(
      file,
      JSON.stringify({ url: 'postgres://top/db', schema: 'shared', stamps: { acme: { schema: 'tidings_acme' }, globex: { url: 'postgres://g/db' } } }),
    );
    const all = resolveGlobals({}, {}, dir);
    assert.deepEqual(
      everyStamp(all).map((stamp) => [stamp.tenant, stamp.url, stamp.schema]),
      [
        ['acme', 'postgres://top/db', 'tidings_acme'],
        ['globex', 'postgres://g/db', 'shared'],
      ],
    );
    assert.throws(
      () => oneStamp(all, 'dead-letters redrive'),
      /tidings dead-letters redrive works on one tenant, .* has stamps for acme, globex: name one with --stamp/,
    );
    const acme = resolveGlobals({ stamp: 'acme' }, {}, dir);
    assert.deepEqual([acme.tenant, acme.url, acme.schema], ['acme', 'postgres://top/db', 'tidings_acme']);
    assert.equal(oneStamp(acme, 'replay'), acme, 'with --stamp a mutating command runs on that stamp');
    assert.deepEqual(everyStamp(acme), [acme]);
    assert.throws(() => resolveGlobals({ stamp: 'initech' }, {}, dir), /--stamp initech: no such stamp in .*; the tenants are acme, globex/);

    writeFileSync(file, JSON.stringify({ stamps: { acme: { schema: 'Bad-Name', vhost: 'x' }, 'a b': {}, globex: 'tidings_globex' } }));
    assert.throws(
      () => resolveGlobals({}, {}, dir),
      (error: Error) =>
        /stamps\.acme\.vhost is not a stamp setting \(they are url, schema, prefix, stream\)/.test(error.message) &&
        /stamps\.acme\.schema "Bad-Name" is invalid/.test(error.message) &&
        /stamps\.a b: "a b" is not a tenant name/.test(error.message) &&
        /stamps\.globex must be an object/.test(error.message),
    );
    writeFileSync(file, JSON.stringify({ stamps: [] }));
    assert.throws(() => resolveGlobals({}, {}, dir), /stamps must be an object of stamps by tenant/);
    writeFileSync(file, JSON.stringify({ stamps: { acme: { url: 5 } } }));
    assert.throws(() => resolveGlobals({}, {}, dir), /stamps\.acme\.url must be a string/);

    rmSync(file);
    const none = resolveGlobals({}, {}, dir);
    assert.equal(oneStamp(none, 'replay'), none, 'without stamps nothing changes');
    assert.throws(() => resolveGlobals({ stamp: 'acme' }, {}, dir), /--stamp acme: no stamps are configured/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
