/**
 * What handlers see and do: the envelope a message carries, what a message published while handling
 * another inherits, handler timeouts, retryLater.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { defineEvent, retryLater, type Message } from '../src/index.ts';
import { Ticked } from './fixtures/contracts.ts';
import { connect, sleep, waitFor } from './helpers.ts';
import { pgWorld } from './fixtures/bus.ts';

const Echoed = defineEvent('test.echoed', { schema: z.object({ of: z.string(), via: z.string() }), key: (data) => data.of });

test('a message published while handling another inherits correlation, causation, tenant and trace, and exists only if the handling commits', async (t) => {
  const world = await pgWorld(t, 'h');
  if (world === undefined) return;
  const upstream = world.bus('upstream');
  const downstream = world.bus('downstream');
  let attempts = 0;
  let parent: Message<unknown> | undefined;
  downstream.subscribe(
    'echo',
    Ticked,
    async (message, ctx) => {
      parent = message;
      await ctx.publish(Echoed, { of: message.id, via: 'ctx.publish' });
      // bus.publish inside a handler joins the handler's transaction too.
      await downstream.publish(Echoed, { of: message.id, via: 'bus.publish' });
      if (++attempts === 1) throw new Error('fail after publishing: the echoes must be rolled back');
    },
    { retry: { immediate: 1, delayed: [] } },
  );
  const echoes: Message<{ of: string; via: string }>[] = [];
  upstream.subscribe('listen-echoes', Echoed, (message) => {
    echoes.push(message);
  });
  await downstream.start();
  await upstream.start();

  const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
  const sent = await upstream.publish(Ticked, { key: 'k', seq: 1 }, { tenant: 'acme', traceparent, subject: 'tick/1', correlationId: 'corr-1' });
  await waitFor('two echoes', () => echoes.length === 2);
  await sleep(200);
  assert.equal(attempts, 2);
  assert.equal(echoes.length, 2, 'the first attempt published nothing: its transaction rolled back');
  assert.ok(parent);
  assert.equal(parent.id, sent.id);
  assert.equal(parent.source, 'tidings://upstream');
  assert.equal(parent.type, 'test.ticked.v1');
  assert.equal(parent.subject, 'tick/1');
  assert.equal(parent.correlationId, 'corr-1');
  for (const echo of echoes) {
    assert.equal(echo.source, 'tidings://downstream');
    assert.equal(echo.correlationId, 'corr-1', 'correlation id carried through');
    assert.equal(echo.causationId, sent.id, 'caused by the handled message');
    assert.equal(echo.tenant, 'acme');
    assert.equal(echo.traceparent, traceparent);
    assert.equal(echo.data.of, sent.id);
  }
  assert.deepEqual(echoes.map((echo) => echo.data.via).sort(), ['bus.publish', 'ctx.publish']);
});

test('a handler that hangs is abandoned at its timeout, the attempt counts as failed, and the consumer goes on', async (t) => {
  const world = await pgWorld(t, 'h');
  if (world === undefined) return;
  const { schema } = world;
  const bus = world.bus('hanging');
  const calls = new Map<number, number>();
  const handled: number[] = [];
  let aborted = 0;
  bus.subscribe(
    'hangs',
    Ticked,
    async (message, ctx) => {
      calls.set(message.data.seq, (calls.get(message.data.seq) ?? 0) + 1);
      if (message.data.note === 'hang') {
        ctx.signal.addEventListener('abort', () => aborted++);
        await new Promise(() => {}); // never settles
      }
      if (message.data.note === 'later' && calls.get(message.data.seq) === 1) return retryLater(100, 'not yet');
      handled.push(message.data.seq);
      return undefined;
    },
    { timeoutMs: 200, retry: { immediate: 1, delayed: [100], jitter: 0 } },
  );
  await bus.start();
  await bus.publish(Ticked, { key: 'a', seq: 1, note: 'hang' });
  await bus.publish(Ticked, { key: 'b', seq: 2 });
  await bus.publish(Ticked, { key: 'c', seq: 3, note: 'later' });
  await waitFor(
    'the hanging message dead-lettered',
    async () => {
      const client = await connect();
      const { rows } = await client.query(`select reason, attempts from "${schema}".dead_letters`);
      await client.end();
      return rows.length === 1 && /did not finish within 200 ms/.test(rows[0].reason);
    },
    10_000,
  );
  await waitFor('the other two handled', () => handled.length === 2);
  assert.equal(calls.get(1), 3, 'three attempts, each abandoned at its timeout');
  assert.equal(aborted, 3, 'each abandoned attempt saw its signal aborted');
  assert.deepEqual(handled.sort(), [2, 3]);
  assert.equal(calls.get(3), 2, 'retryLater ran it again');
});
