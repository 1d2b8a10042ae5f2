/**
 * Workload 9, replicas (issue 6): what a local replica buys on a hot path, and what a drift check costs.
 *
 *   login  the same login (find the user's credentials, then one scrypt verify, N = 1,024 as in the
 *          demo) through a memory-backed replica's lookup, and through a synchronous HTTP call to
 *          identity (node:http in a child process, one indexed query on its own table per request, a
 *          keep-alive agent): a fixed count at a fixed concurrency, closed loop, the two paths
 *          alternating in blocks. Also the data access alone (no scrypt), to show where the time goes.
 *   drift  a replica of N keys (filled by state transfer) checked against its source with 0, 10 and
 *          1,000 differing keys: time, messages exchanged, and the hashes, keys and rows they carried.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { randomBytes, scrypt as scryptCallback, timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import pg from 'pg';
import { z } from 'zod';
import { runChild } from '../load/child.ts';
import { now, percentile, rate, sleep } from '../load/measure.ts';
import { monitorClient } from '../load/pg.ts';
import type { DataOf } from '../../src/index.ts';
import { tidings } from './build.ts';
import type { ChildResult, Task } from '../protocol.ts';

const { createBus, defineEvent } = await tidings<typeof import('../../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../../src/postgres/index.ts')>('postgres/index');
const replicas = await tidings<typeof import('../../src/replica/index.ts')>('replica/index');

const SCHEMA = 'replica_bench';
const scrypt = promisify(scryptCallback) as (password: string, salt: Buffer, keylen: number, options: { N: number }) => Promise<Buffer>;
/** The demo's cost (examples/shop/login.ts). */
const COST = { N: 1024 };
const PASSWORD = 'correct horse battery staple';

const CredentialsChanged = defineEvent('bench.credentials-changed', {
  schema: z.object({ userId: z.string(), username: z.string(), passwordHash: z.string(), salt: z.string(), version: z.number().int() }),
  key: (user) => user.userId,
});
type Credentials = DataOf<typeof CredentialsChanged>;

const STATE = `jsonb_build_object('userId', id, 'username', username, 'passwordHash', password_hash, 'salt', salt, 'version', version)`;
const SOURCE_SELECT = `select id as key, version, ${STATE} as state from ${SCHEMA}.users`;

async function freshSchema(url: string): Promise<void> {
  const client = await monitorClient(url);
  try {
    await client.query(`drop schema if exists ${SCHEMA} cascade`);
    await client.query(`create schema ${SCHEMA}`);
    await client.query(
      `create table ${SCHEMA}.users (id text primary key, username text unique not null, password_hash text not null, salt text not null, version int8 not null)`,
    );
  } finally {
    await client.end();
  }
}

function newBus(task: Task, service: string) {
  return createBus({ service, backbone: postgres({ url: task.pgUrl, schema: SCHEMA, onWarning: () => undefined }) });
}

// ---- identity's HTTP endpoint (a child process: its own event loop, as another service would be) -------

/** `GET /credentials/<username>`: one indexed query on identity's own table. Prints the port. */
async function serveIdentity(url: string): Promise<void> {
  const pool = new pg.Pool({ connectionString: url, max: 8 });
  const server = http.createServer((request, response) => {
    const username = decodeURIComponent((request.url ?? '').replace(/^\/credentials\//, ''));
    pool
      .query<{ state: Credentials }>(`select ${STATE} as state from ${SCHEMA}.users where username = $1`, [username])
      .then(({ rows }) => {
        const body = rows[0] === undefined ? '' : JSON.stringify(rows[0].state);
        response.writeHead(rows[0] === undefined ? 404 : 200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
        response.end(body);
      })
      .catch((error: unknown) => {
        response.writeHead(500);
        response.end(String(error));
      });
  });
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1', () => process.send?.({ port: (server.address() as { port: number }).port }));
}

async function startIdentity(url: string): Promise<{ child: ChildProcess; port: number }> {
  const child = fork(fileURLToPath(import.meta.url), ['--identity-server', url], {
    execArgv: ['--import', 'tsx'],
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (message) => resolve((message as { port: number }).port));
    child.once('exit', (code) => reject(new Error(`identity's HTTP server exited with ${code}`)));
  });
  return { child, port };
}

function httpLookup(agent: http.Agent, port: number, username: string): Promise<Credentials | undefined> {
  return new Promise((resolve, reject) => {
    const request = http.get({ host: '127.0.0.1', port, path: `/credentials/${encodeURIComponent(username)}`, agent }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (body += chunk));
      response.on('end', () => {
        if (response.statusCode === 404) resolve(undefined);
        else if (response.statusCode === 200) resolve(JSON.parse(body) as Credentials);
        else reject(new Error(`identity answered ${response.statusCode}: ${body}`));
      });
    });
    request.on('error', reject);
  });
}

// ---- login ---------------------------------------------------------------------------------------------

async function verify(row: Credentials | undefined, password: string): Promise<boolean> {
  if (row === undefined) return false;
  const hash = await scrypt(password, Buffer.from(row.salt, 'base64'), 32, COST);
  return timingSafeEqual(hash, Buffer.from(row.passwordHash, 'base64'));
}

/** `count` calls of `fn` from `concurrency` loops; each call's latency in ms. */
async function closedLoop(
  count: number,
  concurrency: number,
  fn: (i: number) => Promise<boolean>,
): Promise<{ latencies: number[]; ms: number; failed: number }> {
  const latencies: number[] = [];
  let next = 0;
  let failed = 0;
  const t0 = now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < count) {
        const i = next++;
        const started = now();
        if (!(await fn(i))) failed++;
        latencies.push(now() - started);
      }
    }),
  );
  return { latencies, ms: now() - t0, failed };
}

async function login(task: Task): Promise<ChildResult> {
  const { logins, concurrency, users } = task.replica!;
  await freshSchema(task.pgUrl);
  const identityBus = newBus(task, 'identity');
  await identityBus.start();
  // Users published as identity would (one batch per 1,000). One password and salt for all: the hashes
  // would cost a scrypt each to make and change nothing measured.
  const names = Array.from({ length: users }, (_, i) => `user${i}`);
  const salt = randomBytes(16);
  const hash = (await scrypt(PASSWORD, salt, 32, COST)).toString('base64');
  for (let first = 0; first < users; first += 1_000) {
    const chunk = names
      .slice(first, first + 1_000)
      .map((username, i) => ({ userId: `u-${first + i}`, username, passwordHash: hash, salt: salt.toString('base64'), version: 1 }));
    await identityBus.transaction(async (tx) => {
      await tx.query(
        `insert into ${SCHEMA}.users (id, username, password_hash, salt, version) select r."userId", r.username, r."passwordHash", r.salt, r.version from jsonb_to_recordset($1::jsonb) as r("userId" text, username text, "passwordHash" text, salt text, version int8)`,
        [JSON.stringify(chunk)],
      );
      await identityBus.publishMany(CredentialsChanged, chunk, { tx });
    });
  }
  await identityBus.stop();

  const gateway = newBus(task, 'gateway');
  const creds = replicas.replica(
    gateway,
    replicas.defineReplica<Credentials>({
      name: 'credentials',
      source: 'bench.users',
      feeds: [replicas.feed(CredentialsChanged)],
      indexes: { username: (row) => row.username },
    }),
    {
      memory: true,
      driftCheckEveryMs: 0,
    },
  );
  await gateway.start();
  await creds.start();
  await creds.caughtUp(60_000);
  const identity = await startIdentity(task.pgUrl);
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  try {
    const user = (i: number) => names[(i * 7_919) % users]!;
    const paths = {
      replica: async (i: number) => verify(creds.lookup('username', user(i)), PASSWORD),
      http: async (i: number) => verify(await httpLookup(agent, identity.port, user(i)), PASSWORD),
      replicaLookup: async (i: number) => creds.lookup('username', user(i)) !== undefined,
      httpLookup: async (i: number) => (await httpLookup(agent, identity.port, user(i))) !== undefined,
    };
    // Warm-up (JIT, connections, identity's pool), not measured.
    for (const fn of Object.values(paths)) await closedLoop(Math.min(200, logins), concurrency, fn);
    const metrics: Record<string, number> = { logins, concurrency, users };
    // Alternating blocks, so a slow moment of this shared machine hits both paths alike.
    const BLOCKS = 4;
    const all: Record<string, { latencies: number[]; ms: number }> = {};
    for (let block = 0; block < BLOCKS; block++) {
      for (const [name, fn] of Object.entries(paths)) {
        const run = await closedLoop(Math.ceil(logins / BLOCKS), concurrency, fn);
        const into = (all[name] ??= { latencies: [], ms: 0 });
        into.latencies.push(...run.latencies);
        into.ms += run.ms;
        metrics[`${name}Failed`] = (metrics[`${name}Failed`] ?? 0) + run.failed;
      }
    }
    for (const [name, { latencies, ms }] of Object.entries(all)) {
      const sorted = latencies.sort((a, b) => a - b);
      metrics[`${name}P50`] = percentile(sorted, 50);
      metrics[`${name}P99`] = percentile(sorted, 99);
      metrics[`${name}P999`] = percentile(sorted, 99.9);
      metrics[`${name}Max`] = sorted.at(-1)!;
      metrics[`${name}Rate`] = rate(sorted.length, ms);
    }
    const failed = Object.keys(paths).reduce((sum, name) => sum + metrics[`${name}Failed`]!, 0);
    if (failed > 0) return { ok: false, error: `${failed} logins failed: ${JSON.stringify(metrics)}`, metrics };
    return { ok: true, metrics };
  } finally {
    agent.destroy();
    identity.child.kill();
    creds.stop();
    await gateway.stop();
  }
}

// ---- drift ---------------------------------------------------------------------------------------------

async function drift(task: Task): Promise<ChildResult> {
  const { driftKeys, differences } = task.replica!;
  await freshSchema(task.pgUrl);
  const client = await monitorClient(task.pgUrl);
  const identityBus = newBus(task, 'identity');
  replicas.source(identityBus, replicas.defineSource({ name: 'bench.users', select: SOURCE_SELECT }));
  await identityBus.start();
  const gateway = newBus(task, 'gateway');
  const creds = replicas.replica(
    gateway,
    replicas.defineReplica<Credentials>({ name: 'credentials', source: 'bench.users', feeds: [replicas.feed(CredentialsChanged)] }),
    {
      bootstrap: 'transfer',
      driftCheckEveryMs: 0,
      pageSize: 5_000,
    },
  );
  try {
    await client.query(
      `insert into ${SCHEMA}.users (id, username, password_hash, salt, version)
       select 'u-' || lpad(i::text, 7, '0'), 'user' || i, md5(i::text), md5('salt' || i), 1 from generate_series(1, $1) i`,
      [driftKeys],
    );
    await client.query(`analyze ${SCHEMA}.users`);
    await gateway.start();
    let t0 = now();
    await creds.start(); // a new replica with bootstrap 'transfer' fills itself from the source
    const transferMs = now() - t0;
    const metrics: Record<string, number> = { keys: driftKeys, transferMs, transferRate: rate(driftKeys, transferMs) };
    await sleep(200);
    for (const d of differences) {
      // Different content at the same version: the case only a digest finds (no event tells of it).
      if (d > 0) {
        await client.query(
          `update ${creds.view} set state = jsonb_set(state, '{passwordHash}', '"drifted"') where key in (select key from ${creds.view} order by md5(key || 'bench') limit $1)`,
          [d],
        );
      }
      t0 = now();
      const report = await creds.checkDrift();
      metrics[`ms@${d}`] = now() - t0;
      metrics[`messages@${d}`] = report.messages.sent + report.messages.received;
      metrics[`entries@${d}`] = report.entries;
      metrics[`found@${d}`] = report.missing + report.extra + report.different;
      if (report.different !== d || report.repaired !== d) {
        return { ok: false, error: `drift check with ${d} differences found ${report.different} and repaired ${report.repaired}`, metrics };
      }
    }
    return { ok: true, metrics };
  } finally {
    creds.stop();
    await gateway.stop();
    await identityBus.stop();
    await client.end();
  }
}

if (process.argv[2] === '--identity-server') void serveIdentity(process.argv[3]!);
else runChild({ login, drift });
