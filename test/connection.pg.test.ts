/**
 * Connection problems reported by the library as well as by the CLI: a TidingsError naming the server
 * (never its password) and what to do, for a refused login, a missing database and a server that does not
 * answer; a URL that is not PostgreSQL's refused when the backbone is made.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createBus, TidingsError } from '../src/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { DATABASE_URL, requirePostgres } from './helpers.ts';

/** DATABASE_URL with another user (and a password) or database. */
function variant(change: (url: URL) => void): string {
  const url = new URL(DATABASE_URL);
  change(url);
  return url.toString();
}

async function startFails(url: string): Promise<TidingsError> {
  const bus = createBus({ service: 'connection-test', backbone: postgres({ url, schema: 'never_created', onWarning: () => undefined }) });
  bus.subscribe('never', Ticked, () => undefined);
  try {
    const error = await bus.start().then(
      () => assert.fail('bus.start() should fail'),
      (caught: unknown) => caught,
    );
    assert.ok(error instanceof TidingsError, `a TidingsError, got ${String(error)}`);
    assert.ok(!error.message.includes('s3cret'), 'the password is never printed');
    return error;
  } finally {
    await bus.stop().catch(() => undefined);
  }
}

test('a role the server does not know: the login refused, the URL without its password, what to check', async (t) => {
  if (!(await requirePostgres(t))) return;
  const url = variant((u) => {
    u.username = 'no_such_role_tidings';
    u.password = 's3cret';
  });
  const error = await startFails(url);
  assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
  assert.equal(error.retryable, false);
  const safe = variant((u) => (u.username = 'no_such_role_tidings'));
  assert.ok(error.message.startsWith(`PostgreSQL at ${safe} refused the login (`), error.message);
  assert.match(error.message, /role "no_such_role_tidings" does not exist\)\. Check the user and password in postgres\(\{ url \}\)\.$/);
});

test('a database that does not exist: named, with what to do', async (t) => {
  if (!(await requirePostgres(t))) return;
  const error = await startFails(variant((u) => (u.pathname = '/no_such_database_tidings')));
  assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
  assert.match(
    error.message,
    /^PostgreSQL at postgres:\/\/\S+\/no_such_database_tidings has no such database \(.*\)\. Create it, or fix the database name in postgres\(\{ url \}\)\.$/,
  );
});

test('a server that does not answer: retryable, the URL without its password', async () => {
  const error = await startFails('postgres://someone:s3cret@127.0.0.1:1/test');
  assert.equal(error.code, 'BACKBONE_UNAVAILABLE');
  assert.equal(error.retryable, true);
  assert.match(
    error.message,
    /^PostgreSQL at postgres:\/\/someone@127\.0\.0\.1:1\/test is unreachable .*ECONNREFUSED.*check that the server is running and reachable from here, and postgres\(\{ url \}\)\.$/,
  );
});

test('URLs that are not PostgreSQL connection URLs are refused by postgres(), without echoing them', () => {
  for (const [url, reason] of [
    ['mysql://root:s3cret@localhost/shop', /url must be a PostgreSQL URL \(postgres:\/\/ or postgresql:\/\/\), not mysql:\/\//],
    ['localhost:5432/shop', /url must be a PostgreSQL URL .*not localhost:\/\//],
    ['s3cret at the db host', /url is not a URL: it must start with postgres:\/\//],
    ['postgres://user:s3cr/et@host/db', /url cannot be parsed as a URL: percent-encode special characters/],
    ['', /url must be a PostgreSQL connection URL/],
  ] as const) {
    assert.throws(
      () => postgres({ url }),
      (error: unknown) => {
        assert.ok(error instanceof TidingsError);
        assert.equal(error.code, 'INVALID_OPTIONS');
        assert.match(error.message, reason);
        assert.ok(!error.message.includes('s3cr'), `no password echoed: ${error.message}`);
        return true;
      },
      url,
    );
  }
  for (const url of [
    'postgres://u@localhost/db',
    'postgresql://u:p@db.example:6432/app?sslmode=require',
    'postgres://u@/db?host=/var/run/postgresql',
    '/var/run/postgresql app',
  ]) {
    assert.doesNotThrow(() => postgres({ url }), url);
  }
});
