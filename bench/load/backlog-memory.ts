/**
 * Target T10 of issue 8: the memory of a consumer draining a large backlog stays flat. Writes N events
 * (default 1,000,000, 1,000 keys, ~250 B each) straight into a fresh schema's log with one SQL statement
 * per 100,000 (bench/tidings/fill-log.ts), then drains them with one subscription (inbox on, no-op handler) and samples the process's
 * RSS and heap every second.
 *
 *   npm run bench:memory [-- --events 1000000]
 *
 * Prints the samples and a verdict line; writes bench/results/backlog-memory.json.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { z } from 'zod';
import { createBus, defineEvent, keyHash } from '../../src/index.ts';
import { postgres } from '../../src/postgres/index.ts';
import { fillLog } from '../tidings/fill-log.ts';

const { values: args } = parseArgs({ options: { events: { type: 'string' } } });
const EVENTS = Number(args.events ?? 1_000_000);
const KEYS = 1_000;
const url = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const schema = `backlog_${process.pid}`;
const mb = (bytes: number) => Math.round(bytes / 1024 / 1024);

const Ev = defineEvent('bench.event', {
  schema: z.object({ key: z.string(), seq: z.number(), payload: z.string() }),
  key: (event) => event.key,
});

const admin = new pg.Client({ connectionString: url });
await admin.connect();
const bus = createBus({ service: 'bench', backbone: postgres({ url, schema, retention: false }) });
let handled = 0;
bus.subscribe(
  'drain',
  Ev,
  () => {
    handled++;
  },
  { startFrom: 'beginning' },
);

try {
  // Migrate by opening a bus with no running subscription yet, then fill the log behind it.
  const setup = createBus({ service: 'bench', backbone: postgres({ url, schema, retention: false }) });
  await setup.start();
  await setup.stop();
  // The same key hash Tidings computes, so each key's partition is the one a publish would give it.
  const keyHashes = Array.from({ length: KEYS }, (_, k) => keyHash(`k${k}`));
  const filling = Date.now();
  await fillLog(admin, { schema, events: EVENTS, keyHashes, perTransaction: 100_000 });
  console.log(`Wrote ${EVENTS.toLocaleString('en')} events in ${((Date.now() - filling) / 1000).toFixed(1)} s; draining...`);

  const samples: Array<{ s: number; handled: number; rssMb: number; heapMb: number }> = [];
  const started = Date.now();
  const sample = () => {
    const memory = process.memoryUsage();
    samples.push({ s: Math.round((Date.now() - started) / 1000), handled, rssMb: mb(memory.rss), heapMb: mb(memory.heapUsed) });
  };
  sample();
  const timer = setInterval(() => {
    sample();
    const last = samples.at(-1)!;
    if (last.s % 5 === 0)
      console.log(`  ${String(last.s).padStart(4)} s  ${last.handled.toLocaleString('en').padStart(10)} handled  rss ${last.rssMb} MB  heap ${last.heapMb} MB`);
  }, 1_000);
  await bus.start();
  while (handled < EVENTS) await new Promise((resolve) => setTimeout(resolve, 50));
  clearInterval(timer);
  sample();
  const seconds = (Date.now() - started) / 1000;
  const running = samples.filter((s) => s.handled > EVENTS * 0.05);
  const maxRss = Math.max(...samples.map((s) => s.rssMb));
  const early = running[0]?.rssMb ?? maxRss;
  const late = running.at(-1)?.rssMb ?? maxRss;
  const result = { events: EVENTS, seconds, rate: Math.round(EVENTS / seconds), maxRssMb: maxRss, rssAt5PercentMb: early, rssAtEndMb: late, samples };
  console.log(
    `Drained ${EVENTS.toLocaleString('en')} in ${seconds.toFixed(1)} s (${result.rate.toLocaleString('en')}/s); RSS max ${maxRss} MB, ${early} MB at 5 %, ${late} MB at the end (T10: flat, < 250 MB: ${maxRss < 250 && late <= early * 1.5 ? 'met' : 'missed'})`,
  );
  const out = join(dirname(fileURLToPath(import.meta.url)), '..', 'results', 'backlog-memory.json');
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
} finally {
  await bus.stop().catch(() => undefined);
  await admin.query(`drop schema if exists ${schema} cascade`);
  await admin.end();
}
