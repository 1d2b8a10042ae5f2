/** The fairness workload's event and the noisy tenant's messages, shared by its two processes (fairness.ts, noisy-publisher.ts). */
import { z } from 'zod';
import { tidings } from './build.ts';

const { defineEvent } = await tidings<typeof import('../../src/index.ts')>('index');

const schema = z.object({ key: z.string(), seq: z.number(), payload: z.string() });
export const TenantEvent = defineEvent('bench.tenant-event', { schema, key: (e) => e.key });
/** The noisy tenant's events when it has a subscription of its own (variant `isolated`). */
export const IsolatedEvent = defineEvent('bench.isolated-event', { schema, key: (e) => e.key });

export const NOISY = 'noisy';
const NOISY_KEYS = 1_000;
export const PAYLOAD = 'x'.repeat(210);

export const noisyEvents = (first: number, n: number) =>
  Array.from({ length: n }, (_, i) => ({ key: `n${(first + i) % NOISY_KEYS}`, seq: first + i, payload: PAYLOAD }));
