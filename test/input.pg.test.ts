/**
 * Hostile input on PostgreSQL: payloads over the limit, strings PostgreSQL cannot store, hostile names, deep
 * nesting at publish, and rows written by hand into the log. Each contained; the rest flows. The limits every
 * backbone shares are tried in test/conformance/hostile.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type pg from 'pg';
import { z } from 'zod';
import { defineEvent, keyHash, TidingsError } from '../src/index.ts';
import { postgres, readStatus } from '../src/postgres/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { pgWorld } from './fixtures/bus.ts';
import { logCount } from './fixtures/effects.ts';
import { connect, DATABASE_URL, sleep, waitFor } from './helpers.ts';

/** Bounds every test: a hang fails it instead of the whole run. */
const bounded = { timeout: 60_000 };
/** The retention tests run retention themselves and count what it deletes: the backbone's own must not. */
const faultDefaults = { retention: false } as const;

const Nested = defineEvent('test.nested', {
  schema: z.object({ key: z.string(), tree: z.unknown() }),
  key: (data) => data.key,
  description: 'Any JSON under tree',
});
type Tree = string | { a: Tree };
const tree: z.ZodType<Tree> = z.lazy(() => z.union([z.string(), z.object({ a: tree })]));
const Recursive = defineEvent('test.recursive', {
  schema: z.object({ key: z.string(), tree }),
  key: (data) => data.key,
  description: 'A recursive schema',
});
const Loose = defineEvent('test.loose', {
  schema: z.looseObject({ key: z.string() }),
  key: (data) => data.key,
  description: 'Keeps unknown keys',
});

function deepObject(levels: number): Tree {
  let value: Tree = 'leaf';
  for (let i = 0; i < levels; i++) value = { a: value };
  return value;
}
const deepJson = (levels: number) => `${'{"a":'.repeat(levels)}"leaf"${'}'.repeat(levels)}`;

/** A row written behind Tidings' back, as a broken producer or a hand-made fix would. */
async function insertRow(db: pg.Client, schema: string, row: { id: string; topic?: string; key?: string; data: string }): Promise<void> {
  const key = row.key ?? 'x';
  const topic = row.topic ?? 'test.ticked';
  await db.query(
    `insert into "${schema}".log (topic, id, type, source, time, key, key_hash, correlation_id, data)
     values ($1, $2, $3, 'psql', now(), $4, $5, $2, $6::jsonb)`,
    [topic, row.id, `${topic}.v1`, key, keyHash(key), row.data],
  );
}

test(
  'hostile input at publish: an oversized payload, a NUL among concurrent publishes, hostile names; each refused alone with the right error',
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'hostile', faultDefaults);
    if (world === undefined) return;
    const { schema } = world;
    const db = await connect();
    try {
      const bus = world.bus();
      const seen = new Map<string, string>();
      bus.subscribe('hostile-publish', Ticked, (message) => {
        seen.set(message.id, message.key);
      });
      await bus.start();

      // Over maxPayloadBytes (256 KiB by default): refused before anything is written.
      const huge = await bus.publish(Ticked, { key: 'big', seq: 1, note: 'x'.repeat(300 * 1024) }).catch((error: unknown) => error);
      assert.ok(huge instanceof TidingsError && huge.code === 'PAYLOAD_TOO_LARGE', `PAYLOAD_TOO_LARGE, got ${String(huge)}`);
      assert.match(huge.message, /over the limit of 262144/);
      assert.equal(await logCount(db, schema), 0);

      // jsonb cannot store NUL. Published alongside valid messages, all gathered into one group commit:
      // only the bad one fails, and it names itself.
      const valid = Array.from({ length: 20 }, (_, seq) => bus.publish(Ticked, { key: `v${seq % 4}`, seq }));
      const nul = bus.publish(Ticked, { key: 'nul', seq: 0, note: 'a\u0000b' }, { id: 'the-nul-message' }).catch((error: unknown) => error);
      const more = Array.from({ length: 20 }, (_, seq) => bus.publish(Ticked, { key: `v${seq % 4}`, seq: 20 + seq }));
      const error = await nul;
      assert.ok(error instanceof TidingsError && error.code === 'INVALID_PAYLOAD', `INVALID_PAYLOAD, got ${String(error)}`);
      assert.equal(error.ref?.id, 'the-nul-message');
      assert.match(error.message, /the-nul-message/);
      const ids = (await Promise.all([...valid, ...more])).map((published) => published.id);
      await waitFor('the 40 valid messages', () => ids.every((id) => seen.has(id)));

      // Names become SQL identifiers or channel payloads nowhere: they are validated, and refused here.
      const hostileNames = [`orders"; drop table log; --`, "orders'; select 1", 'orders;placed', 'заказы.создан', 'orders.placed-🎉', 'Orders.Placed', ''];
      for (const name of hostileNames) {
        assert.throws(
          () => defineEvent(name, { schema: z.object({}) }),
          (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_CONTRACT',
          `event ${JSON.stringify(name)}`,
        );
        assert.throws(
          () => bus.subscription(name),
          (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_CONTRACT',
          `subscription ${JSON.stringify(name)}`,
        );
        assert.throws(
          () => postgres({ url: DATABASE_URL, schema: name }),
          (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_OPTIONS',
          `schema ${JSON.stringify(name)}`,
        );
      }
      // Keys and subjects are values, always parameters: delivered exactly as given. Tenants too, but a tenant
      // id with quotes or backslashes is refused before anything is written (docs/tenancy.md).
      const oddKeys = [`'; drop table "${schema}".log; --`, 'ключ-🔑', 'a"b\\c', '$1::text'];
      const odd = await Promise.all(
        oddKeys.map((key, seq) => bus.publish(Ticked, { key, seq }, { subject: key, ...(key.includes("'") || key.includes('"') ? {} : { tenant: key }) })),
      );
      for (const key of [oddKeys[0]!, oddKeys[2]!]) {
        await assert.rejects(bus.publish(Ticked, { key, seq: 0 }, { tenant: key }), (e: unknown) => e instanceof TidingsError && e.code === 'INVALID_TENANT');
      }
      await waitFor('the odd keys', () => odd.every((published) => seen.has(published.id)));
      assert.deepEqual(
        odd.map((published) => seen.get(published.id)),
        oddKeys,
      );
      // The admin functions take names as parameters too.
      await assert.rejects(readStatus(db, { schema, subscription: `x'; drop table "${schema}".log; --` }), /has no subscription x'; drop table/);
      assert.equal(await logCount(db, schema), 44, 'the log is intact');
    } finally {
      await db.end();
    }
  },
);

test(
  'strings PostgreSQL cannot store, published alongside valid messages (a lone surrogate in the data, a NUL in a key or tenant): refused alone with INVALID_PAYLOAD, the others committed',
  // A lone surrogate (JSON.stringify writes it as \udXXX, which jsonb rejects: 22P02) or a NUL in a text
  // column (22P05) would fail the shared INSERT of a group commit, and every publish gathered into it.
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'utf', faultDefaults);
    if (world === undefined) return;
    const bus = world.bus();
    await bus.start();
    const outcomes: Record<string, unknown> = {};
    for (const [name, data, options] of [
      ['lone surrogate in data', { key: 'k', seq: 1, note: 'broken \ud800 pair' }, {}],
      ['NUL in a key given in options', { key: 'k', seq: 1 }, { key: 'k\u0000' }],
      ['NUL in tenant', { key: 'k', seq: 1 }, { tenant: 't\u0000' }],
    ] as const) {
      const valid = Array.from({ length: 10 }, (_, seq) =>
        bus.publish(Ticked, { key: 'ok', seq }).then(
          () => 'ok',
          (error: Error) => error.message,
        ),
      );
      const bad = bus.publish(Ticked, data, { ...options, id: 'the-bad-one' }).then(
        () => 'accepted',
        (error: unknown) => (error instanceof TidingsError ? `${error.code} ${error.ref?.id}` : `raw ${(error as Error).message}`),
      );
      const others = await Promise.all(valid);
      outcomes[name] = { bad: await bad, others: others.every((outcome) => outcome === 'ok') ? 'all committed' : others.find((o) => o !== 'ok') };
    }
    t.diagnostic(JSON.stringify(outcomes));
    const expected = { bad: 'INVALID_PAYLOAD the-bad-one', others: 'all committed' };
    // A NUL in a tenant is not a tenant id: refused before the bus assigns the message anything (docs/tenancy.md).
    const notATenant = { bad: 'INVALID_TENANT undefined', others: 'all committed' };
    assert.deepEqual(outcomes, { 'lone surrogate in data': expected, 'NUL in a key given in options': expected, 'NUL in tenant': notATenant });
  },
);

test(
  'deeply nested JSON (5,000 levels) at publish is refused with LIMIT_EXCEEDED (INVALID_PAYLOAD where the schema overflows first), writes nothing, and the bus goes on',
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'deep', faultDefaults);
    if (world === undefined) return;
    const { schema } = world;
    const db = await connect();
    try {
      const bus = world.bus();
      await bus.start();
      const outcomes: Record<string, string> = {};
      for (const [name, publish] of [
        // The schema accepts anything under `tree`; the payload cannot be serialised (V8 recurses).
        ['z.unknown()', () => bus.publish(Nested, { key: 'n', tree: deepObject(5_000) })],
        // A recursive schema recurses itself.
        ['z.lazy() recursive schema', () => bus.publish(Recursive, { key: 'n', tree: deepObject(5_000) })],
      ] as const) {
        const error = await publish().then(
          () => undefined,
          (e: unknown) => e,
        );
        assert.ok(error !== undefined, `${name}: refused`);
        outcomes[name] = error instanceof TidingsError ? error.code : `${(error as Error).name}: ${(error as Error).message}`;
      }
      t.diagnostic(`errors at publish: ${JSON.stringify(outcomes)}`);
      // The depth limit (messageLimits.depth, 64) refuses it before JSON.stringify would overflow; a recursive
      // schema overflows while validating, before the limit is checked.
      assert.deepEqual(outcomes, { 'z.unknown()': 'LIMIT_EXCEEDED', 'z.lazy() recursive schema': 'INVALID_PAYLOAD' });
      assert.equal(await logCount(db, schema), 0, 'nothing written');
      // 60 levels are fine, through the same schemas; 70 are over the limit.
      await bus.publish(Nested, { key: 'n', tree: deepObject(60) });
      await bus.publish(Recursive, { key: 'n', tree: deepObject(60) });
      assert.equal(await logCount(db, schema), 2);
      for (const contract of [Nested, Recursive]) {
        await assert.rejects(
          bus.publish(contract, { key: 'n', tree: deepObject(70) }),
          (error: unknown) => error instanceof TidingsError && error.code === 'LIMIT_EXCEEDED' && /nested more than 64/.test(error.message),
        );
      }
      assert.equal(await logCount(db, schema), 2);
    } finally {
      await db.end();
    }
  },
);

test(
  'hostile rows in the log (written by hand): data that breaks the schema, __proto__ and constructor keys, 5,000 levels of nesting; invalid UTF-8 cannot get in. Each contained; the consumer goes on',
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'rows', faultDefaults);
    if (world === undefined) return;
    const { schema } = world;
    const db = await connect();
    try {
      const bus = world.bus();
      const seen: Array<{ id: string; seq: number; proto: unknown; polluted: unknown }> = [];
      const loose: unknown[] = [];
      // One partition: a row that blocked its lane would block everything after it.
      bus.subscribe(
        'careful',
        Ticked,
        (message) => {
          seen.push({ id: message.id, seq: message.data.seq, proto: Object.getPrototypeOf(message.data), polluted: ({} as Record<string, unknown>).polluted });
        },
        { partitions: 1 },
      );
      bus.subscribe(
        'loose',
        Loose,
        (message) => {
          loose.push({
            data: message.data,
            polluted: ({} as Record<string, unknown>).polluted,
            ownProto: Object.getPrototypeOf(message.data) === Object.prototype,
          });
        },
        { partitions: 1 },
      );
      await bus.start();

      await bus.publish(Ticked, { key: 'x', seq: 1 });
      await insertRow(db, schema, { id: 'breaks-schema', data: '{"key": "x", "seq": "one"}' });
      await insertRow(db, schema, {
        id: 'proto-keys',
        data: '{"key": "x", "seq": 2, "__proto__": {"polluted": "yes"}, "constructor": {"prototype": {"polluted": "yes"}}}',
      });
      await insertRow(db, schema, { id: 'deep-but-valid', data: `{"key": "x", "seq": 3, "extra": ${deepJson(5_000)}}` });
      // PostgreSQL refuses invalid UTF-8 outright: such a row cannot reach a consumer.
      await assert.rejects(
        db.query(
          `insert into "${schema}".log (topic, id, type, source, time, key, key_hash, correlation_id, data)
         values ('test.ticked', 'bad-utf8', 'test.ticked.v1', 'psql', now(), convert_from('\\x78ff'::bytea, 'UTF8'), 1, 'bad-utf8', '{}')`,
        ),
        (error: Error & { code?: string }) => error.code === '22021',
      );
      // Published through the bus, with keys that a careless merge would turn into prototype pollution.
      const hostile = JSON.parse(
        '{"key": "p", "__proto__": {"polluted": "yes"}, "constructor": {"prototype": {"polluted": "yes"}}, "toString": "not a function"}',
      );
      await bus.publish(Loose, hostile);
      await bus.publish(Ticked, { key: 'x', seq: 4 });

      await waitFor('the valid messages after the hostile rows', () => seen.some((s) => s.seq === 4) && loose.length === 1);
      assert.deepEqual(
        seen.map((s) => s.seq),
        [1, 2, 3, 4],
      );
      for (const s of seen) {
        assert.equal(s.proto, Object.prototype, `${s.id}: data is a plain object`);
        assert.equal(s.polluted, undefined, `${s.id}: Object.prototype not polluted`);
      }
      assert.equal(({} as Record<string, unknown>).polluted, undefined, 'no prototype pollution in this process');
      assert.deepEqual(loose, [
        { data: { key: 'p', constructor: { prototype: { polluted: 'yes' } }, toString: 'not a function' }, polluted: undefined, ownProto: true },
      ]);
      // The dead letter is written by the acknowledgement of its batch, which may commit after seq 4's handler ran.
      const deadLetters = async () => (await db.query(`select message_id, reason from "${schema}".dead_letters order by id`)).rows;
      await waitFor('the dead letter committed', async () => (await deadLetters()).length > 0);
      await sleep(100); // a second dead letter, if there were one, would be in the same acknowledgement
      const rows = await deadLetters();
      assert.deepEqual(
        rows.map((row: { message_id: string }) => row.message_id),
        ['breaks-schema'],
      );
      assert.match(rows[0].reason, /invalid payload.*seq/);
    } finally {
      await db.end();
    }
  },
);

test(
  'a hand-written row nested 5,000 levels deep that breaks the schema is dead-lettered, and its partition goes on',
  // The dead letter's data once went back to PostgreSQL through JSON.stringify, which overflows at this
  // depth: the acknowledgement failed, the batch was read again and failed again, the partition stuck.
  bounded,
  async (t) => {
    const world = await pgWorld(t, 'stuck', faultDefaults);
    if (world === undefined) return;
    const { schema } = world;
    const db = await connect();
    try {
      const warnings = new Set<string>();
      const bus = world.bus('faults', { onWarning: (message) => void warnings.add(message) });
      const seen: number[] = [];
      bus.subscribe('careful', Ticked, (message) => void seen.push(message.data.seq), { partitions: 1 });
      await bus.start();
      await insertRow(db, schema, { id: 'deep-and-invalid', data: `{"key": "x", "seq": "one", "extra": ${deepJson(5_000)}}` });
      await bus.publish(Ticked, { key: 'x', seq: 1 });
      const deadLetters = async () =>
        (await db.query(`select message_id from "${schema}".dead_letters`)).rows.map((row: { message_id: string }) => row.message_id);
      const acknowledged = async () => Number((await db.query(`select sum(handled)::int as n from "${schema}".cursors`)).rows[0].n);
      try {
        await waitFor(
          'the deep row in dead letters, and the batch acknowledged',
          async () => (await deadLetters()).length > 0 && (await acknowledged()) >= 2,
          6_000,
        );
      } finally {
        t.diagnostic(
          `after the deep row: the next message was handled ${seen.length} times; dead letters ${JSON.stringify(await deadLetters())}; acknowledged ${await acknowledged()}; warnings ${JSON.stringify([...new Set([...warnings].map((w) => w.replace(/retrying in \d+ ms/, 'retrying')))])}`,
        );
      }
      assert.deepEqual(await deadLetters(), ['deep-and-invalid']);
      assert.deepEqual(seen, [1], 'the next message handled once, its batch acknowledged');
    } finally {
      await db.end();
    }
  },
);

// ---- back-pressure -------------------------------------------------------------------------------

/** Collects garbage now, so heap figures measure what is retained, not what awaits collection. */
