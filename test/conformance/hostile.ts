/**
 * Hostile input, on every backbone: messages that break a limit (src/core/limits.ts) at publish and on the
 * wire, at and around each limit; values JSON cannot carry; handlers whose errors no store would take;
 * versions no handler reads; foreign messages without the optional attributes. Each case asserts the
 * poison is contained (refused with an error naming the limit, or dead-lettered with the reason) and
 * every other message is handled, once, in order. Part of the conformance suite (suite.ts).
 */
import assert from 'node:assert/strict';
import { test, type TestContext } from 'node:test';
import { deadLetter, keyHash, TidingsError, type Backbone, type Bus } from '../../src/index.ts';
import type { Envelope } from '../../src/core/envelope.ts';
import { messageLimits } from '../../src/core/limits.ts';
import { foreignTick, Ticked } from '../fixtures/contracts.ts';
import { sleep, waitFor } from '../helpers.ts';
import type { ConformanceTarget, Namespace } from './suite.ts';

export interface SuiteKit<Tx> {
  world(t: TestContext): Promise<Namespace<Tx> | undefined>;
  /** A bus on a new backbone instance of the namespace: another process, as far as the backbone can tell. */
  newBus(namespace: Namespace<Tx>): Bus<Tx>;
  stop(bus: Bus<Tx>): Promise<void>;
}

/** `length` bytes of UTF-8 in three-byte characters, topped up with ASCII. */
function utf8Of(bytes: number): string {
  return '€'.repeat(Math.floor(bytes / 3)) + 'x'.repeat(bytes % 3);
}

function nested(depth: number): unknown {
  let value: unknown = 'bottom';
  for (let i = 0; i < depth; i++) value = { down: value };
  return value;
}

/** Writes an envelope as a producer that checks nothing would: straight to the backbone, past the bus. */
async function inject<Tx>(backbone: Backbone<Tx>, envelope: Envelope): Promise<unknown> {
  try {
    await backbone.publish([{ envelope, json: JSON.stringify(envelope.data), keyHash: keyHash(envelope.partitionkey) }]);
    return undefined;
  } catch (error) {
    return error;
  }
}

function foreign(key: string, seq: number, overrides: Partial<Envelope> = {}): Envelope {
  return foreignTick(key, { key, seq }, overrides);
}

export function hostileInput<Tx>(target: ConformanceTarget<Tx>, kit: SuiteKit<Tx>): void {
  test('limits: refused at publish naming the limit, nothing written; a message at every limit is retried, dead-lettered and redriven', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const handled: string[] = [];
    const attempts = new Map<number, number>();
    let refuse = true;
    bus.subscribe(
      'edge',
      Ticked,
      (message) => {
        const n = (attempts.get(message.data.seq) ?? 0) + 1;
        attempts.set(message.data.seq, n);
        if (message.data.note === 'fail-once' && n === 1) throw new Error('once');
        if (message.data.note === 'refuse' && refuse) return deadLetter('refused until redriven');
        handled.push(`${message.data.seq}:${message.key.length}:${message.id.length}`);
        return undefined;
      },
      { retry: { immediate: 0, delayed: [200], jitter: 0 }, partitions: 1 },
    );
    await bus.start();

    const over: Array<[string, () => Promise<unknown>, string, RegExp]> = [
      [
        'an id of 256 ASCII bytes',
        () => bus.publish(Ticked, { key: 'k', seq: -1 }, { id: 'i'.repeat(256) }),
        'LIMIT_EXCEEDED',
        /id is 256 bytes, over the limit of 255/,
      ],
      ['an id of 86 three-byte characters', () => bus.publish(Ticked, { key: 'k', seq: -1 }, { id: '€'.repeat(86) }), 'LIMIT_EXCEEDED', /id is 258 bytes/],
      [
        'a key of 1,025 bytes',
        () => bus.publish(Ticked, { key: 'k', seq: -1 }, { key: utf8Of(1_025) }),
        'LIMIT_EXCEEDED',
        /key is 1025 bytes, over the limit of 1024/,
      ],
      ['a key of 100 kB from the key function', () => bus.publish(Ticked, { key: 'k'.repeat(100_000), seq: -1 }), 'LIMIT_EXCEEDED', /key is 100000 bytes/],
      [
        'a correlation id of 256 bytes',
        () => bus.publish(Ticked, { key: 'k', seq: -1 }, { correlationId: 'c'.repeat(256) }),
        'LIMIT_EXCEEDED',
        /correlation id is 256 bytes/,
      ],
      [
        'a causation id of 256 bytes',
        () => bus.publish(Ticked, { key: 'k', seq: -1 }, { causationId: 'c'.repeat(256) }),
        'LIMIT_EXCEEDED',
        /causation id is 256 bytes/,
      ],
      ['a tenant of 256 bytes', () => bus.publish(Ticked, { key: 'k', seq: -1 }, { tenant: 't'.repeat(256) }), 'LIMIT_EXCEEDED', /tenant is 256 bytes/],
      ['a subject of 1,025 bytes', () => bus.publish(Ticked, { key: 'k', seq: -1 }, { subject: 's'.repeat(1_025) }), 'LIMIT_EXCEEDED', /subject is 1025 bytes/],
      [
        'a malformed traceparent',
        () => bus.publish(Ticked, { key: 'k', seq: -1 }, { traceparent: 'x'.repeat(10_000) }),
        'LIMIT_EXCEEDED',
        /not a W3C traceparent/,
      ],
      [
        'a tracestate of 513 bytes',
        () => bus.publish(Ticked, { key: 'k', seq: -1 }, { tracestate: 'a=b,'.repeat(129).slice(0, 513) }),
        'LIMIT_EXCEEDED',
        /tracestate is 513 bytes/,
      ],
      [
        'data nested 65 deep',
        () => bus.publish(Ticked, { key: 'k', seq: -1, deep: nested(64) } as never),
        'LIMIT_EXCEEDED',
        /data\.deep(\.down)+ is nested more than 64 levels/,
      ],
      [
        'data nested 100,000 deep',
        () => bus.publish(Ticked, { key: 'k', seq: -1, deep: nested(100_000) } as never),
        'LIMIT_EXCEEDED',
        /nested more than 64|nested too deeply/,
      ],
      ['Infinity in data', () => bus.publish(Ticked, { key: 'k', seq: -1, extra: [1, Infinity] } as never), 'INVALID_PAYLOAD', /data\.extra\.1 is Infinity/],
      ['NaN in data', () => bus.publish(Ticked, { key: 'k', seq: -1, extra: { n: Number.NaN } } as never), 'INVALID_PAYLOAD', /data\.extra\.n is NaN/],
      ['a BigInt in data', () => bus.publish(Ticked, { key: 'k', seq: -1, extra: 10n } as never), 'INVALID_PAYLOAD', /BigInt/],
      [
        'one bad message among good ones in publishMany',
        () => bus.publishMany(Ticked, [{ key: 'k', seq: -1 }, { key: 'k', seq: -2, extra: -Infinity } as never]),
        'INVALID_PAYLOAD',
        /-Infinity/,
      ],
    ];
    for (const [what, publish, code, pattern] of over) {
      const error = await publish().then(
        () => undefined,
        (e: unknown) => e,
      );
      assert.ok(error instanceof TidingsError, `${what}: refused with a TidingsError (got ${String(error)})`);
      assert.equal(error.code, code, `${what}: code`);
      assert.equal(error.retryable, false, `${what}: not worth retrying`);
      assert.match(error.message, pattern, what);
      assert.match(error.message, /test\.ticked/, `${what}: names the contract`);
    }

    // At every limit at once: the longest id, key, correlation id and tenant, the deepest data.
    const atLimit = (seq: number, note?: string) =>
      bus.publish(Ticked, { key: 'edge', seq, ...(note === undefined ? {} : { note }), deep: nested(63) } as never, {
        id: `${seq}-`.padEnd(messageLimits.idBytes, 'i'),
        key: utf8Of(messageLimits.keyBytes),
        correlationId: 'c'.repeat(messageLimits.idBytes),
        tenant: utf8Of(messageLimits.idBytes),
        subject: utf8Of(messageLimits.keyBytes),
      });
    await atLimit(1, 'fail-once'); // waits for a delayed retry: its key is held
    await atLimit(2); // behind it
    await atLimit(3, 'refuse'); // dead-lettered, then redriven
    await atLimit(4);
    await bus.publish(Ticked, { key: 'other', seq: 5 });
    const longKey = utf8Of(messageLimits.keyBytes).length;
    await waitFor('every message at the limits', () => handled.length >= 4, 20_000);
    assert.deepEqual(
      handled.filter((entry) => !entry.startsWith('5:')),
      [`1:${longKey}:255`, `2:${longKey}:255`, `4:${longKey}:255`],
    );
    assert.equal(attempts.get(1), 2, 'the first was retried once, after its delay');
    const store = bus.backbone.deadLetters();
    await waitFor('the refused one in dead letters', async () => (await store.count({ subscription: 'edge' })) === 1);
    const [letter] = (await store.list({ subscription: 'edge' })).deadLetters;
    assert.equal(letter!.key, utf8Of(messageLimits.keyBytes));
    assert.equal(letter!.messageId, '3-'.padEnd(messageLimits.idBytes, 'i'));
    refuse = false;
    assert.equal((await store.redrive({ subscription: 'edge' })).count, 1);
    await waitFor('the redriven one', () => handled.some((entry) => entry.startsWith('3:')), 20_000);
    await sleep(200);
    assert.equal(handled.length, 5, `each once: ${handled.join(' ')}`);
    assert.ok(!handled.some((entry) => entry.startsWith('-')), 'nothing refused was written');
  });

  test('foreign messages over the limits are refused or dead-lettered with the reason; the rest of their partition flows', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const handled: string[] = [];
    bus.subscribe(
      'foreign-limits',
      Ticked,
      (message) => {
        handled.push(`${message.data.key}:${message.data.seq}`);
      },
      { partitions: 1, retry: { immediate: 0, delayed: [100], jitter: 0 } },
    );
    await bus.start();
    const poisons: Array<[string, Envelope, RegExp]> = [
      ['an id of 300 bytes', foreign('p', 1, { id: 'i'.repeat(300) }), /id is 300 bytes/],
      ['a key of 5,000 bytes', foreign('k'.repeat(5_000), 2), /key is 5000 bytes/],
      ['a key of 3,000 bytes in three-byte characters', foreign('€'.repeat(1_000), 3), /key is 3000 bytes/],
      ['a correlation id of 2,000 bytes', foreign('p', 4, { correlationid: 'c'.repeat(2_000) }), /correlation id is 2000 bytes/],
      ['a tenant of 1,000 bytes', foreign('p', 5, { tenant: 't'.repeat(1_000) }), /tenant is 1000 bytes/],
    ];
    const refused: string[] = [];
    let good = 0;
    for (const [what, envelope, pattern] of poisons) {
      await bus.publish(Ticked, { key: 'good', seq: good++ });
      const error = await inject(bus.backbone, envelope);
      if (error !== undefined) {
        // Refused before it was written: as good as a dead letter, if the error says why and not to retry.
        assert.ok(error instanceof TidingsError && !error.retryable, `${what}: refused for good (got ${String(error)})`);
        assert.match(error.message, /limit|too long|too large|255|exceed/i, what);
        refused.push(what);
      }
      void pattern;
    }
    await bus.publish(Ticked, { key: 'good', seq: good++ });
    await waitFor('every good message', () => handled.length >= good, 20_000);
    const store = bus.backbone.deadLetters();
    const expected = poisons.length - refused.length;
    await waitFor(`${expected} dead letters`, async () => (await store.count({ subscription: 'foreign-limits' })) >= expected, 20_000);
    await sleep(300);
    assert.deepEqual(
      handled,
      Array.from({ length: good }, (_, i) => `good:${i}`),
      'the good messages, each once, in order',
    );
    const { deadLetters } = await store.list({ subscription: 'foreign-limits' });
    assert.equal(deadLetters.length, expected);
    for (const [what, envelope, pattern] of poisons) {
      if (refused.includes(what)) continue;
      const letter = deadLetters.find((dead) => dead.reason.match(pattern));
      assert.ok(letter !== undefined, `${what}: dead-lettered with the limit in its reason (reasons: ${deadLetters.map((d) => d.reason).join(' | ')})`);
      assert.match(letter.reason, /over the limit/);
      void envelope;
    }
    // Redriven, they are refused again (by the redrive, naming the limit, or back in dead letters), and nothing else moves.
    const redrive = await store.redrive({ subscription: 'foreign-limits' }).then(
      () => undefined,
      (error: unknown) => error,
    );
    if (redrive !== undefined)
      assert.ok(redrive instanceof TidingsError && redrive.code === 'LIMIT_EXCEEDED', `a redrive refused names the limit (got ${String(redrive)})`);
    await bus.publish(Ticked, { key: 'good', seq: good++ });
    await waitFor('the message after the redrive', () => handled.length >= good, 20_000);
    await waitFor('the poison back in dead letters', async () => (await store.count({ subscription: 'foreign-limits' })) === expected, 20_000);
    await sleep(300);
    assert.deepEqual(
      handled,
      Array.from({ length: good }, (_, i) => `good:${i}`),
    );
  });

  test("a handler's hostile errors are kept, made storable: NUL, lone surrogates, megabytes of text; the rest flows", async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const handled: number[] = [];
    const tries = new Map<number, number>();
    const ugly = `nul \u0000 lone \ud800 tail \udc00 ${'x'.repeat(2_000_000)}`;
    bus.subscribe(
      'ugly-errors',
      Ticked,
      (message) => {
        const n = (tries.get(message.data.seq) ?? 0) + 1;
        tries.set(message.data.seq, n);
        const error = new Error(ugly);
        if (message.data.note === 'throws') throw error;
        if (message.data.note === 'throws-once' && n === 1) throw error;
        if (message.data.note === 'gives-up') return deadLetter(`gave up \u0000 ${'\ud83d'} ${ugly}`);
        if (message.data.note === 'throws-odd') {
          const odd = new Error('odd');
          Object.defineProperty(odd, 'name', { value: 'Odd\u0000Name' });
          (odd as { code?: string }).code = 'X\u0000';
          throw odd;
        }
        handled.push(message.data.seq);
        return undefined;
      },
      { partitions: 1, retry: { immediate: 1, delayed: [100], jitter: 0 } },
    );
    await bus.start();
    const notes = ['throws', 'throws-once', 'gives-up', 'throws-odd', undefined];
    for (const [seq, note] of notes.entries()) await bus.publish(Ticked, { key: `k${seq}`, seq, ...(note === undefined ? {} : { note }) });
    for (let seq = notes.length; seq < notes.length + 5; seq++) await bus.publish(Ticked, { key: 'k1', seq }); // behind throws-once
    await waitFor('every message that can succeed', () => handled.length >= 7, 20_000);
    const store = bus.backbone.deadLetters();
    await waitFor('three dead letters', async () => (await store.count({ subscription: 'ugly-errors' })) === 3, 20_000);
    assert.deepEqual(
      handled.slice().sort((a, b) => a - b),
      [1, 4, 5, 6, 7, 8, 9],
    );
    assert.deepEqual(
      handled.filter((seq) => seq === 1 || seq >= 5),
      [1, 5, 6, 7, 8, 9],
      'key k1 kept its order behind its retry',
    );
    const { deadLetters } = await store.list({ subscription: 'ugly-errors' });
    for (const summary of deadLetters) {
      const [letter] = await store.show(summary.id);
      assert.ok(letter !== undefined);
      const text = JSON.stringify(letter);
      assert.ok(!text.includes('\\u0000'), 'no NUL kept');
      assert.ok(text.length < 200_000, `cut to a storable size (${text.length} characters)`);
      for (const attempt of letter.attempts) assert.ok(attempt.error.message.length > 0);
    }
  });

  test('a newer version than the handler reads is dead-lettered naming it; an older or foreign-typed one is handled', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const handled: number[] = [];
    bus.subscribe(
      'versions',
      Ticked,
      (message) => {
        handled.push(message.data.seq);
      },
      { partitions: 1 },
    );
    await bus.start();
    await bus.publish(Ticked, { key: 'v', seq: 1 });
    assert.equal(await inject(bus.backbone, foreign('v', 2, { type: 'test.ticked.v9' })), undefined);
    assert.equal(await inject(bus.backbone, foreign('v', 3, { type: 'test.ticked.v0' })), undefined);
    assert.equal(await inject(bus.backbone, foreign('v', 4, { type: 'com.example.ticked' })), undefined);
    await bus.publish(Ticked, { key: 'v', seq: 5 });
    await waitFor('the handled ones', () => handled.length >= 4, 20_000);
    const store = bus.backbone.deadLetters();
    await waitFor('the newer version in dead letters', async () => (await store.count({ subscription: 'versions' })) === 1, 20_000);
    assert.deepEqual(handled, [1, 3, 4, 5]);
    const [letter] = (await store.list({ subscription: 'versions' })).deadLetters;
    assert.match(letter!.reason, /no handler for version 9 of test\.ticked \(it reads version 1\)/);
  });

  test('foreign messages without the optional attributes are handled, retried after a delay, dead-lettered and redriven intact', async (t) => {
    const namespace = await kit.world(t);
    if (namespace === undefined) return;
    const bus = kit.newBus(namespace);
    const seen: Array<{ seq: number; attempt: number; subject: unknown; tenant: unknown; causation: unknown; trace: unknown }> = [];
    let failing = true;
    bus.subscribe(
      'bare',
      Ticked,
      (message, ctx) => {
        seen.push({
          seq: message.data.seq,
          attempt: ctx.attempt,
          subject: message.subject,
          tenant: message.tenant,
          causation: message.causationId,
          trace: message.traceparent,
        });
        if (message.data.seq === 1 && ctx.attempt === 1) throw new Error('after a delay, please');
        if (message.data.seq === 2 && failing) throw new Error('dead, then redriven');
        return undefined;
      },
      { partitions: 1, retry: { immediate: 0, delayed: [150], jitter: 0 } },
    );
    await bus.start();
    for (const seq of [1, 2, 3]) assert.equal(await inject(bus.backbone, foreign('bare', seq)), undefined);
    const store = bus.backbone.deadLetters();
    await waitFor('seq 3, after 1 and 2', () => seen.some((entry) => entry.seq === 3), 20_000);
    await waitFor('seq 2 dead-lettered', async () => (await store.count({ subscription: 'bare' })) === 1, 20_000);
    failing = false;
    assert.equal((await store.redrive({ subscription: 'bare' })).count, 1);
    await waitFor('seq 2 redriven', () => seen.filter((entry) => entry.seq === 2).length === 3, 20_000);
    await sleep(200);
    assert.deepEqual(
      seen.map((entry) => `${entry.seq}@${entry.attempt}`).slice(0, 4),
      ['1@1', '1@2', '2@1', '2@2'],
      'seq 1 retried after its delay, before its key went on',
    );
    for (const entry of seen) {
      assert.equal(entry.subject, undefined, 'no subject invented');
      assert.equal(entry.tenant, undefined, 'no tenant invented');
      assert.equal(entry.causation, undefined, 'no causation invented');
      assert.equal(entry.trace, undefined, 'no trace invented');
    }
    assert.equal(seen.filter((entry) => entry.seq === 3).length, 1);
  });

  void target;
}
