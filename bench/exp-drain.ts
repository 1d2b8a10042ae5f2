// Experiment: drain with allocation sampling (or CPU profile) limited to the drain itself.
import { Session } from 'node:inspector';
import { writeFileSync } from 'node:fs';
import { z } from 'zod';
import pg from 'pg';
import { tidings } from './lib/tidings.ts';
const { createBus, defineEvent } = await tidings<typeof import('../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../src/postgres/index.ts')>('postgres/index');
const url = 'postgres://root@127.0.0.1:5432/bench';
const N = Number(process.env.N ?? 40000);
const mode = process.env.MODE ?? 'none';
const Ev = defineEvent('bench.event', { schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }), key: (e) => e.key });
const c = new pg.Client(url); await c.connect(); await c.query('drop schema if exists exp_drain cascade'); await c.end();
const pub = createBus({ service: 'bench', backbone: postgres({ url, schema: 'exp_drain' }) });
await pub.transaction(async () => undefined);
const FILL = 'x'.repeat(210);
for (let f = 0; f < N; f += 1000) await pub.publishMany(Ev, Array.from({ length: 1000 }, (_, i) => ({ key: `k${(f + i) % 1000}`, seq: f + i, payload: FILL })));
await pub.stop();
let handled = 0; let done!: () => void; const all = new Promise<void>((r) => { done = r; });
const bus = createBus({ service: 'bench', backbone: postgres({ url, schema: 'exp_drain' }) });
await bus.transaction(async () => undefined);
let first = 0; bus.subscribe('drain', Ev, async () => { if (first === 0) first = performance.now(); if (++handled === N) done(); }, { concurrency: 8, partitions: 4, batchSize: 500, inbox: true, startFrom: 'beginning' });
const s = new Session(); s.connect();
const post = (m: string, p?: object) => new Promise<any>((res, rej) => s.post(m, p ?? {}, (e, r) => (e ? rej(e) : res(r))));
if (mode === 'alloc') { await post('HeapProfiler.enable'); await post('HeapProfiler.startSampling', { samplingInterval: 1024, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true }); }
if (mode === 'cpu') { await post('Profiler.enable'); await post('Profiler.start'); }
const t0 = performance.now();
await bus.start();
const started = performance.now();
await all;
const ms = performance.now() - t0;
if (mode === 'alloc') writeFileSync('/tmp/drain.heapprofile', JSON.stringify((await post('HeapProfiler.stopSampling')).profile));
if (mode === 'cpu') writeFileSync('/tmp/drain.cpuprofile', JSON.stringify((await post('Profiler.stop')).profile));
console.log('start()', (started - t0).toFixed(0), 'ms; first handler', (first - t0).toFixed(0), 'ms;', JSON.stringify({ read: (globalThis as any).__readWait, prev: (globalThis as any).__prevWait, miss: (globalThis as any).__miss, batches: (globalThis as any).__batches }), `handled ${N} in ${ms.toFixed(0)} ms: ${(N / ms * 1000).toFixed(0)}/s`);
await bus.stop();
process.exit(0);
