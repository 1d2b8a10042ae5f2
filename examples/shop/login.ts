/**
 * "Asynchronous, high-performance login for web farms": identity owns users and their credentials and
 * publishes every change; each gateway node keeps its own replica of the credentials (in a table, and
 * in memory), so a login is a local lookup with no call to identity. Logins keep working while identity
 * is down; a password change reaches every gateway through the bus.
 */
import { randomBytes, scrypt as scryptCallback, timingSafeEqual } from 'node:crypto';
import { promisify } from 'node:util';
import { z } from 'zod';
import { createBus, defineEvent, type Bus, type DataOf } from 'tidings';
import type { PgTransaction, PostgresBackbone } from 'tidings/postgres';
import { defineReplica, defineSource, feed, replica, source, type Replica } from 'tidings/replica';

const scrypt = promisify(scryptCallback) as (password: string, salt: Buffer, keylen: number, options: { N: number }) => Promise<Buffer>;
/** scrypt's cost; low so the demo stays quick (use the default 16384 or more in production). */
const COST = { N: 1024 };

export const CredentialsChanged = defineEvent('identity.credentials-changed', {
  schema: z.object({ userId: z.string(), username: z.string(), passwordHash: z.string(), salt: z.string(), version: z.number().int() }),
  key: (user) => user.userId,
  description: 'A user registered or changed their password (the hash, never the password).',
});
export const UserRemoved = defineEvent('identity.user-removed', {
  schema: z.object({ userId: z.string(), version: z.number().int() }),
  key: (user) => user.userId,
});

type Credentials = DataOf<typeof CredentialsChanged>;

/** Identity's side: its table, the source declaration replicas check against, and changes that publish. */
function identityService(backbone: PostgresBackbone) {
  const bus = createBus({ service: 'identity', backbone, publishes: [CredentialsChanged, UserRemoved] });
  source(
    bus,
    defineSource({
      name: 'identity.users',
      select: `select id as key, version, jsonb_build_object('userId', id, 'username', username, 'passwordHash', password_hash, 'salt', salt, 'version', version) as state from identity.users`,
    }),
  );
  const setPassword = async (userId: string, username: string, password: string) => {
    const salt = randomBytes(16);
    const passwordHash = (await scrypt(password, salt, 32, COST)).toString('base64');
    await bus.transaction(async (tx) => {
      const { rows } = await tx.query<{ version: number }>(
        `insert into identity.users (id, username, password_hash, salt, version) values ($1, $2, $3, $4, 1)
         on conflict (id) do update set password_hash = excluded.password_hash, salt = excluded.salt, version = identity.users.version + 1
         returning version`,
        [userId, username, passwordHash, salt.toString('base64')],
      );
      await bus.publish(CredentialsChanged, { userId, username, passwordHash, salt: salt.toString('base64'), version: Number(rows[0]!.version) }, { tx });
    });
  };
  return { bus, setPassword };
}

const credentials = defineReplica<Credentials>({
  name: 'credentials',
  source: 'identity.users',
  feeds: [feed(CredentialsChanged), feed(UserRemoved, { delete: true })],
  indexes: { username: (row) => row.username },
});

/** A gateway's login: a lookup in its own replica, and scrypt. No call to identity. */
async function login(gateway: Replica<Credentials>, username: string, password: string): Promise<boolean> {
  const row = gateway.lookup('username', username);
  if (row === undefined) return false;
  const hash = await scrypt(password, Buffer.from(row.salt, 'base64'), 32, COST);
  return timingSafeEqual(hash, Buffer.from(row.passwordHash, 'base64'));
}

export async function loginDemo(backbone: () => PostgresBackbone, db: { query(sql: string): Promise<unknown> }): Promise<boolean> {
  console.log('\n--- Login for a web farm: every gateway keeps a replica of the credentials ---');
  await db.query('create schema if not exists identity');
  await db.query(
    'create table if not exists identity.users (id text primary key, username text unique not null, password_hash text not null, salt text not null, version int8 not null)',
  );
  let identity = identityService(backbone());
  await identity.bus.start();
  const USERS = 20;
  const names = Array.from({ length: USERS }, (_, i) => `user${i + 1}`);
  for (const [i, name] of names.entries()) await identity.setPassword(`u-${i + 1}`, name, `pw-${name}`);

  const gatewayBuses: Bus<PgTransaction>[] = [];
  const gateways: Replica<Credentials>[] = [];
  for (const node of ['gw1', 'gw2', 'gw3']) {
    const bus = createBus({ service: `gateway-${node}`, backbone: backbone() });
    gateways.push(replica(bus, credentials, { instance: node, memory: true, driftCheckEveryMs: 0 }));
    gatewayBuses.push(bus);
    await bus.start();
  }
  for (const gateway of gateways) {
    await gateway.start();
    await gateway.caughtUp();
  }
  console.log(`identity registered ${USERS} users; 3 gateways filled their replicas by replaying identity's events`);

  const loginRound = async () => {
    let ok = 0;
    const started = process.hrtime.bigint();
    for (const [i, name] of names.entries()) if (await login(gateways[i % 3]!, name, `pw-${name}`)) ok++;
    return { ok, ms: Number(process.hrtime.bigint() - started) / 1e6 };
  };
  const first = await loginRound();
  console.log(`${first.ok}/${USERS} logins succeeded across the gateways (${(first.ms / USERS).toFixed(2)} ms each, almost all of it scrypt)`);

  await identity.bus.stop();
  const down = await loginRound();
  console.log(`identity stopped: ${down.ok}/${USERS} logins still succeed (no gateway calls identity)`);

  identity = identityService(backbone());
  await identity.bus.start();
  const changed = Date.now();
  await identity.setPassword('u-1', 'user1', 'new-secret');
  // Wait for the change to reach every gateway.
  while (!(await Promise.all(gateways.map((gateway) => login(gateway, 'user1', 'new-secret')))).every(Boolean))
    await new Promise((resolve) => setTimeout(resolve, 5));
  const reached = Date.now() - changed;
  const oldWorks = (await Promise.all(gateways.map((gateway) => login(gateway, 'user1', 'pw-user1')))).some(Boolean);
  console.log(
    `identity back; user1 changed their password: every gateway accepts the new one after ${reached} ms, the old one works ${oldWorks ? 'STILL (wrong)' : 'nowhere'}`,
  );

  // Someone edits a row of gw2's table by hand: a drift check finds it and repairs it from identity's
  // state, over the bus (identity answers; nobody calls it directly).
  console.log(
    'now, on purpose, user u-2\'s row in gw2\'s replica table is changed by hand (its password hash set to "tampered"), as a bug or a manual edit would do',
  );
  await db.query(`update ${gateways[1]!.view} set state = jsonb_set(state, '{passwordHash}', '"tampered"') where key = 'u-2'`);
  const report = await gateways[1]!.checkDrift();
  const [row] = await gateways[1]!.query('key = $1', ['u-2']);
  const repaired = row !== undefined && row.passwordHash !== 'tampered';
  console.log(
    `drift check on gw2: ${report.different} different, ${report.missing} missing, ${report.extra} extra, ${report.repaired} repaired in ${report.durationMs} ms ` +
      `over ${report.messages.sent + report.messages.received} messages; the row is ${repaired ? "back to identity's state" : 'STILL tampered'}`,
  );
  const staleness = await gateways[0]!.staleness();
  console.log(`gw1 staleness: ${staleness.lag} events behind, newest applied event ${staleness.ageMs} ms old`);

  for (const gateway of gateways) gateway.stop();
  for (const bus of gatewayBuses) await bus.stop();
  await identity.bus.stop();
  return first.ok === USERS && down.ok === USERS && !oldWorks && repaired && report.different === 1;
}
