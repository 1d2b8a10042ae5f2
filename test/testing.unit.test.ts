/**
 * tidings/testing: the virtual clock fires retries, scheduled messages, schedules' ticks and saga timeouts
 * hours away in milliseconds, in order; given/when/then with readable failures. The same story runs on
 * PostgreSQL in testing.pg.test.ts.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { z } from 'zod';
import { defineEvent } from '../src/index.ts';
import { testBus, type TestBus } from '../src/testing/index.ts';
import { SagaCancelled } from './fixtures/contracts.ts';
import { Payment, paymentStory } from './fixtures/payment-story.ts';

const Reminder = defineEvent('test.reminder', { schema: z.object({ user: z.string(), n: z.number().int() }), key: (data) => data.user });

test('the virtual clock: delayed retries an hour apart, a message scheduled a day ahead and hourly ticks, in milliseconds', async (t) => {
  const kit = testBus({ startAt: new Date('2027-03-01T00:00:00Z') });
  t.after(() => kit.stop());
  const attempts: string[] = [];
  kit.bus.subscribe(
    'reminders',
    Reminder,
    (message, ctx) => {
      attempts.push(`${message.data.n}@${new Date(kit.clock!.now()).toISOString().slice(11, 16)}#${ctx.attempt}`);
      if (message.data.n === 1 && ctx.attempt < 3) throw new Error('mail server down');
    },
    { retry: { immediate: 0, delayed: [3_600_000, 3_600_000], jitter: 0 } },
  );
  kit.bus.schedule('hourly', '0 * * * *', Reminder, (tick) => ({ user: 'cron', n: tick.getUTCHours() + 100 }));
  await kit.start();
  const started = Date.now();
  await kit.when(Reminder, { user: 'ann', n: 1 });
  await kit.bus.publish(Reminder, { user: 'bob', n: 2 }, { delayMs: 24 * 3_600_000 });
  assert.deepEqual(attempts, ['1@00:00#1']);
  await kit.advance('1h');
  await kit.advance('1h');
  // At 01:00 the tick's timer was set first (at start), then the retry's: they fire in that order.
  assert.deepEqual(attempts, ['1@00:00#1', '101@01:00#1', '1@01:00#2', '102@02:00#1', '1@02:00#3'], 'retries and ticks at their virtual times');
  await kit.advance('22h');
  assert.ok(attempts.includes('2@00:00#1'), 'the message scheduled a day ahead, at its time');
  assert.equal(kit.published(Reminder).filter((message) => message.data.n >= 100).length, 24, 'one tick an hour');
  assert.ok(attempts.indexOf('2@00:00#1') > attempts.indexOf('123@23:00#1'), 'in time order');
  assert.ok(Date.now() - started < 5_000, `a virtual day in ${Date.now() - started} ms`);
});

test('given/when/then on a saga: compensation published, a timeout half an hour later, readable failures', async (t) => {
  const kit = testBus();
  t.after(() => kit.stop());
  await paymentStory(kit as TestBus<unknown>);
  kit.expectPublished(SagaCancelled, { orderId: 'o1', reason: 'declined' });
  await kit.advance('29m');
  kit.expectNotPublished({ ...SagaCancelled, topic: 'test.nothing' });
  assert.throws(
    () => kit.expectPublished(SagaCancelled, { orderId: 'o2' }),
    /No test\.saga-cancelled message with \{"orderId":"o2"\}; published: \{"orderId":"o1","reason":"declined"\}/,
  );
  await kit.advance('1m');
  kit.expectPublished(SagaCancelled, { orderId: 'o2', reason: 'no payment within 30 minutes' });
  const o2 = await kit.saga(Payment, 'o2');
  assert.deepEqual([o2?.state.status, o2?.completed], ['timed-out', true]);
  assert.deepEqual(await kit.deadLetters(), []);
});
