/**
 * ChannelAcks (src/rabbitmq/consume/acks.ts) on a recording channel: which frames it sends for messages finished out
 * of order. The consumer tests cover it on a real broker; this pins the arithmetic of `allUpTo`.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Channel, Message } from 'amqplib';
import { ChannelAcks } from '../src/rabbitmq/consume/acks.ts';

function recording(): { channel: Channel; frames: string[] } {
  const frames: string[] = [];
  const channel = {
    ack: (message: Message, allUpTo = false) => frames.push(`${allUpTo ? '<=' : ''}${message.fields.deliveryTag}`),
  } as unknown as Channel;
  return { channel, frames };
}

const message = (tag: number) => ({ fields: { deliveryTag: tag } }) as unknown as Message;

test('acks: finished messages heading the channel go in one allUpTo frame, the others alone, none twice, none left', () => {
  const { channel, frames } = recording();
  const acks = new ChannelAcks(channel);
  for (let tag = 1; tag <= 8; tag++) acks.delivered(message(tag));
  for (const tag of [3, 1, 2, 6]) acks.ack(message(tag));
  acks.flush();
  assert.deepEqual(frames, ['<=3', '6'], '1-3 together; 6 alone (4 and 5 still run)');
  acks.ack(message(4));
  acks.flush();
  assert.deepEqual(frames.slice(2), ['4'], 'one message heading the channel: no allUpTo');
  for (const tag of [8, 5, 7]) acks.ack(message(tag));
  acks.flush();
  assert.deepEqual(frames.slice(3), ['<=8'], '5, 7 and 8 head the channel once 6 is gone: one frame');
  acks.flush();
  assert.equal(frames.length, 4, 'nothing left to send');
});

test('acks: sent at the end of the event-loop turn without a flush; discard drops what a closed channel cannot take', async () => {
  const { channel, frames } = recording();
  const acks = new ChannelAcks(channel);
  for (let tag = 1; tag <= 3; tag++) acks.delivered(message(tag));
  acks.ack(message(1));
  acks.ack(message(2));
  assert.deepEqual(frames, [], 'not yet: more may finish in this turn');
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(frames, ['<=2']);
  acks.ack(message(3));
  acks.discard();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(frames, ['<=2'], 'discarded: the broker redelivers 3');
});
