/**
 * Request/reply on PostgreSQL across processes: answering workers in child processes, one killed with -9
 * while requests are in flight. What every backbone promises is in test/conformance/requests.ts.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { after, test } from 'node:test';
import { createBus, type Bus } from '../src/index.ts';
import { postgres, type PgTransaction } from '../src/postgres/index.ts';
import { quickPostgres } from './conformance/postgres.ts';
import { Quote } from './fixtures/contracts.ts';
import { DATABASE_URL, dropSchema, requirePostgres, uniqueSchema, waitFor } from './helpers.ts';

const schemas: string[] = [];
const buses: Bus<PgTransaction>[] = [];
after(async () => {
  await Promise.all(buses.map((bus) => bus.stop().catch(() => undefined)));
  for (const schema of schemas) await dropSchema(schema);
});

function startPricer(schema: string, answered: { count: number }): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', 'test/fixtures/pricer.ts'], {
    env: { ...process.env, DATABASE_URL, SCHEMA: schema, HANDLE_MS: '5' },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`pricer exited with ${code} before it was ready`)));
    child.stdout!.on('data', (chunk: Buffer) => {
      const text = chunk.toString();
      answered.count += text.split('answered ').length - 1;
      if (text.includes('ready')) {
        child.removeAllListeners('exit');
        resolve(child);
      }
    });
  });
}

test('1,000 concurrent requests answered by two worker processes, one killed with -9 midway: every request gets its own reply', async (t) => {
  if (!(await requirePostgres(t))) return;
  const schema = uniqueSchema('req');
  schemas.push(schema);
  const client = createBus({ service: 'client', backbone: postgres({ url: DATABASE_URL, schema, ...quickPostgres }) });
  buses.push(client);
  await client.start();
  const answered = { count: 0 };
  const pricers = [await startPricer(schema, answered), await startPricer(schema, answered)];
  try {
    const started = Date.now();
    const requests = Array.from({ length: 1_000 }, (_, n) => client.request(Quote, { key: `k${n % 50}`, n }, { timeoutMs: 60_000 }));
    await waitFor('a fifth answered', () => answered.count >= 200, 60_000);
    pricers[0]!.kill('SIGKILL');
    const replies = await Promise.all(requests);
    assert.deepEqual(
      replies.map((reply) => reply.price),
      Array.from({ length: 1_000 }, (_, n) => n * 2),
      'every request its own reply',
    );
    t.diagnostic(`1,000 requests in ${Date.now() - started} ms, the kill and the lease's expiry included; ${client.stats().requests.late} late replies`);
  } finally {
    for (const pricer of pricers) if (pricer.exitCode === null && pricer.signalCode === null) pricer.kill('SIGKILL');
  }
});
