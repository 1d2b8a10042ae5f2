/**
 * Contract evolution checks (src/asyncapi/compatibility.ts) and the commands that run them, without a
 * database: `tidings asyncapi --module ... --check` and `tidings contracts check --module ... --against file`,
 * driven through the real binary, on the modules of test/fixtures/contracts-evolution.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { compatibility, contractsOfCode, contractsOfDocument, schemaChanges } from '../src/asyncapi/compatibility.ts';
import { asyncapiDocument } from '../src/asyncapi/document.ts';
import { loadModule } from '../src/cli/module.ts';
import { parseAsyncApi } from './fixtures/asyncapi.ts';
import { runTidings } from './helpers.ts';

const FIXTURES = 'test/fixtures/contracts-evolution';
const dir = mkdtempSync(join(tmpdir(), 'tidings-contracts-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const noWarnings = (message: string) => assert.fail(`unexpected warning: ${message}`);

async function deployed() {
  const before = await loadModule(`${FIXTURES}/before.ts`, process.cwd(), noWarnings);
  return contractsOfDocument(asyncapiDocument(before.services));
}

async function code(module: string) {
  const loaded = await loadModule(`${FIXTURES}/${module}.ts`, process.cwd(), noWarnings);
  return contractsOfCode(loaded.contracts, loaded.services);
}

test('breaking changes in the same version: required field added, field removed, retyped, enum narrowed, version reused; each names its consumers', async () => {
  const findings = compatibility(await deployed(), await code('breaking'));
  const breaking = findings.filter((finding) => finding.breaking).map((finding) => `${finding.contract} ${finding.field ?? '-'}: ${finding.change}`);
  assert.deepEqual(breaking, [
    'orders.order-placed v1 -: version 1 reused with a different schema: give the new schema version 2, with an upcaster from 1',
    'orders.order-placed v1 note: field removed',
    'orders.order-placed v1 amountCents: retyped from integer to string',
    'orders.order-placed v1 status: enum narrowed: "cancelled" no longer allowed',
    'orders.order-placed v1 currency: required field added: older messages do not have it',
  ]);
  for (const finding of findings.filter((each) => each.contract.startsWith('orders.order-placed'))) {
    assert.deepEqual(finding.consumers, ['audit/audit.all', 'billing/billing.charge']);
  }
  // Adding an optional field: reported, not breaking (messages of either schema pass the other)...
  const shipped = findings.filter((finding) => finding.contract === 'orders.order-shipped v1');
  assert.ok(shipped.length > 0 && shipped.every((finding) => !finding.breaking));
  // ...unless every version is immutable.
  const strict = compatibility(await deployed(), await code('breaking'), { strictVersions: true });
  assert.ok(strict.some((finding) => finding.breaking && finding.contract === 'orders.order-shipped v1'));
});

test('a new version with an upcaster is compatible for its readers; the consumers still on version 1 are named', async () => {
  const findings = compatibility(await deployed(), await code('upcast'));
  const breaking = findings.filter((finding) => finding.breaking);
  assert.equal(breaking.length, 1, JSON.stringify(findings, null, 2));
  assert.equal(breaking[0]!.contract, 'orders.order-placed v1 -> v2');
  assert.match(breaking[0]!.change, /consumers on an older version dead-letter version 2 messages/);
  assert.deepEqual(breaking[0]!.consumers, ['audit/audit.all', 'billing/billing.charge']);
  assert.ok(findings.some((finding) => !finding.breaking && /version 2 reads version 1 through its upcaster/.test(finding.change)));
});

test('schema changes field by field: nested fields, array items, widened types and enums, descriptions ignored', () => {
  const was = {
    type: 'object',
    properties: {
      price: { type: 'object', properties: { amount: { type: 'integer' } }, required: ['amount'] },
      tags: { type: 'array', items: { type: 'string', enum: ['a', 'b'] } },
      note: { type: 'string', description: 'old words' },
    },
    required: ['price'],
  };
  const now = {
    type: 'object',
    properties: {
      price: { type: 'object', properties: { amount: { type: 'number' }, currency: { type: 'string' } }, required: ['amount', 'currency'] },
      tags: { type: 'array', items: { type: 'string', enum: ['a', 'b', 'c'] } },
      note: { type: 'string', description: 'new words' },
    },
    required: ['price'],
  };
  assert.deepEqual(
    schemaChanges(was, now).map((change) => `${change.breaking ? 'breaking' : 'ok'} ${change.field}: ${change.change}`),
    [
      'ok price.amount: widened from integer to number',
      'breaking price.currency: required field added: older messages do not have it',
      'ok tags[]: enum widened: "c" added',
    ],
  );
});

test('tidings contracts check exits 1 on breaking changes against a document, 0 when compatible; --json lists the findings', async () => {
  const document = join(dir, 'before.json');
  const written = await runTidings(['asyncapi', '--module', `${FIXTURES}/before.ts`, '--out', document]);
  assert.equal(written.code, 0, written.stderr);
  await parseAsyncApi(readFileSync(document, 'utf8'));
  const broken = await runTidings(['contracts', 'check', '--module', `${FIXTURES}/breaking.ts`, '--against', document]);
  assert.equal(broken.code, 1, broken.stderr);
  assert.match(
    broken.stdout,
    /BREAKING orders\.order-placed v1, field amountCents: retyped from integer to string \(consumers: audit\/audit\.all, billing\/billing\.charge\)/,
  );
  assert.match(broken.stderr, /5 breaking changes against .*before\.json/);
  const same = await runTidings(['contracts', 'check', '--module', `${FIXTURES}/before.ts`, '--against', document]);
  assert.equal(same.code, 0, same.stderr);
  assert.match(same.stdout, /compatible with .*: no changes/);
  const json = await runTidings(['--json', 'contracts', 'check', '--module', `${FIXTURES}/upcast.ts`, '--against', document]);
  assert.equal(json.code, 1);
  const { findings } = JSON.parse(json.stdout) as { findings: Array<{ breaking: boolean; contract: string }> };
  assert.deepEqual(
    findings.filter((finding) => finding.breaking).map((finding) => finding.contract),
    ['orders.order-placed v1 -> v2'],
  );
});

test('tidings asyncapi --check: exit 0 when the committed document matches the code, 1 with the differences when not', async () => {
  const document = join(dir, 'committed.json');
  assert.equal((await runTidings(['asyncapi', '--module', `${FIXTURES}/before.ts`, '--out', document])).code, 0);
  const matching = await runTidings(['asyncapi', '--module', `${FIXTURES}/before.ts`, '--check', document]);
  assert.equal(matching.code, 0, matching.stderr);
  assert.match(matching.stdout, /matches the system in test\/fixtures\/contracts-evolution\/before\.ts/);
  const edited = JSON.parse(readFileSync(document, 'utf8'));
  edited.channels['orders.order-placed'].messages['orders.order-placed.v1'].payload.required.push('currency');
  delete edited.operations['audit.audit.all.receive.orders.order-shipped'];
  writeFileSync(document, JSON.stringify(edited));
  const stale = await runTidings(['asyncapi', '--module', `${FIXTURES}/before.ts`, '--check', document]);
  assert.equal(stale.code, 1);
  assert.match(
    stale.stderr,
    /~ \/channels\/orders\.order-placed\/messages\/orders\.order-placed\.v1\/payload\/required: \["orderId","amountCents","status","currency"\] -> \["orderId","amountCents","status"\]/,
  );
  assert.match(stale.stderr, /\+ \/operations\/audit\.audit\.all\.receive\.orders\.order-shipped: /);
  assert.match(stale.stderr, /is out of date: .* update it with tidings asyncapi --module test\/fixtures\/contracts-evolution\/before\.ts --out /);
  const one = await runTidings(['asyncapi', '--module', `${FIXTURES}/before.ts`, '--service', 'billing']);
  assert.equal(one.code, 0, one.stderr);
  assert.deepEqual(Object.keys(JSON.parse(one.stdout).operations), ['billing.billing.charge.receive.orders.order-placed']);
  const missing = await runTidings(['asyncapi', '--module', `${FIXTURES}/before.ts`, '--service', 'shipping']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /No service shipping in the system in test\/fixtures\/contracts-evolution\/before\.ts; there: audit, billing, orders/);
});
