/**
 * Soak: a steady publish/consume load on a real PostgreSQL server for a given time, to show that memory,
 * latency and table sizes stay flat. Not part of `npm test`.
 *
 *   npx tsx --conditions=tidings-source scripts/soak.ts --seconds 60 [--url postgres://...] [--rate 1000]
 *
 * Publishers (`--publishers` loops, `--rate` messages per second in all, 0 for as fast as they go) publish
 * one event at a time on `--keys` keys, each key owned by one loop, so its sequence numbers commit in
 * order. Two subscriptions consume it: `billing` (every 200th message fails once and is retried, every
 * 1,000th is dead-lettered, every 10th writes through ctx.tx) and `audit` (counts). Retention runs every
 * 2 s with short windows (log 10 s, inbox and dead letters 15 s) and VACUUMs after deleting, so table
 * sizes level off within the run instead of growing with every message sent.
 *
 * Every 5 s it prints throughput, latency from the publish call to the handler's start (p50, p99, max),
 * the process's RSS and heap, and the sizes of the log, inbox and dead_letters tables. At the end it waits
 * for the consumers to drain, then exits non-zero if:
 *   - a message was lost (a key's sequence has a gap that no failed publish explains) or handled out of
 *     order within its key;
 *   - RSS at the end is more than 1.5x the RSS after warm-up. A steady process's RSS moves with V8's heap
 *     sizing and allocator slack, by tens of percent at most; growing by half again means something holds
 *     on to what it has handled;
 *   - the heap after a full GC grew by more than 16 MB + 25 % over its size after warm-up: the sharper
 *     measure, since it excludes garbage not yet collected. What the process keeps per key, and the
 *     latency histograms, are of fixed size, so neither grows with the number of messages.
 * The warm-up is the first quarter of the run (at least 10 s): pools open, JIT compiles, tables and
 * histograms reach their working size.
 */
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import v8 from 'node:v8';
import vm from 'node:vm';
import pg from 'pg';
import { z } from 'zod';
import { createBus, deadLetter, defineEvent, TidingsError } from '../src/index.ts';
import { postgres } from '../src/postgres/index.ts';
import { Retention, type PruneResult } from '../src/postgres/retention.ts';

const { values: args } = parseArgs({
  options: {
    seconds: { type: 'string', default: '60' },
    url: { type: 'string' },
    rate: { type: 'string', default: '1000' },
    publishers: { type: 'string', default: '32' },
    keys: { type: 'string', default: '200' },
    payload: { type: 'string', default: '200' },
    schema: { type: 'string' },
    keep: { type: 'boolean', default: false },
  },
});
const seconds = Number(args.seconds);
const url = args.url ?? process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/test';
const rate = Number(args.rate);
const publishers = Number(args.publishers);
const keyCount = Number(args.keys);
const payloadBytes = Number(args.payload);
const schema = args.schema ?? `soak_${process.pid}`;
for (const [name, value] of Object.entries({ seconds, rate, publishers, keys: keyCount, payload: payloadBytes })) {
  if (!Number.isFinite(value) || value < 0 || (name !== 'rate' && name !== 'payload' && value < 1)) {
    console.error(`soak: --${name} must be a number${name === 'rate' ? ' (0: as fast as possible)' : ' from 1'}`);
    process.exit(2);
  }
}

const Charged = defineEvent('soak.charged', {
  schema: z.object({ key: z.string(), seq: z.number().int(), at: z.number(), kind: z.enum(['ok', 'flaky', 'poison']), pad: z.string() }),
  key: (data) => data.key,
  description: 'One unit of soak load',
});

// ---- measuring -----------------------------------------------------------------------------------

/** Latencies in log-spaced buckets (5 % wide): fixed memory however many samples. */
class Histogram {
  static readonly #base = Math.log(1.05);
  readonly #counts = new Float64Array(600);
  count = 0;
  max = 0;

  add(ms: number): void {
    const index = ms <= 0.01 ? 0 : Math.min(this.#counts.length - 1, Math.max(0, Math.ceil(Math.log(ms / 0.01) / Histogram.#base)));
    this.#counts[index]!++;
    this.count++;
    if (ms > this.max) this.max = ms;
  }

  /** The bucket's upper bound holding the p-th percentile (within 5 %). */
  percentile(p: number): number {
    if (this.count === 0) return 0;
    const rank = Math.ceil((p / 100) * this.count);
    let seen = 0;
    for (let i = 0; i < this.#counts.length; i++) {
      seen += this.#counts[i]!;
      if (seen >= rank) return Math.min(this.max, 0.01 * 1.05 ** i);
    }
    return this.max;
  }

  reset(): void {
    this.#counts.fill(0);
    this.count = 0;
    this.max = 0;
  }
}

/**
 * Checks one subscription's deliveries key by key: a key's messages must arrive in sequence. A repeat is
 * a redelivery (at-least-once); a jump is a loss, unless the publishes in between failed.
 */
class Ledger {
  readonly next = new Map<string, number>();
  handled = 0;
  duplicates = 0;
  readonly violations: string[] = [];

  constructor(readonly name: string) {}

  record(key: string, seq: number): void {
    const expected = this.next.get(key) ?? 0;
    if (seq < expected) {
      this.duplicates++;
      return;
    }
    let skipped = expected;
    while (skipped < seq && failed.has(`${key}:${skipped}`)) skipped++;
    if (seq !== skipped && this.violations.length < 20) this.violations.push(`${this.name}: ${key} got ${seq}, expected ${expected}`);
    this.next.set(key, seq + 1);
    this.handled++;
  }

  /** Messages whose publish resolved and that this subscription has not handled yet. */
  missing(): number {
    let missing = 0;
    for (const [key, last] of lastPublished) {
      for (let seq = this.next.get(key) ?? 0; seq <= last; seq++) if (!failed.has(`${key}:${seq}`)) missing++;
    }
    return missing;
  }
}

const lastPublished = new Map<string, number>();
const failed = new Set<string>();
const billing = new Ledger('billing');
const audit = new Ledger('audit');
const interval = new Histogram();
const overall = new Histogram();
/** After warm-up only: the steady state, without connection set-up and JIT. */
const steady = new Histogram();
let measuringSteady = false;
let published = 0;
let publishErrors = 0;
let lastPublishError = '';
let retentionRuns = 0;
let retentionDeleted = { log: 0, inbox: 0, deadLetters: 0 };

// ---- the buses -----------------------------------------------------------------------------------

const warnings = new Map<string, number>();
const onWarning = (message: string) => warnings.set(message.replace(/\d+/g, 'N'), (warnings.get(message.replace(/\d+/g, 'N')) ?? 0) + 1);
// The soak runs its own retention at short windows: the buses' default one (the backbone's `retention`
// option) stays off.
const publisherBackbone = postgres({ url, schema, onWarning, retention: false });
const producer = createBus({ service: 'soak-orders', backbone: publisherBackbone });
const consumer = createBus({ service: 'soak-billing', backbone: postgres({ url, schema, onWarning, retention: false }) });

consumer.subscribe(
  'billing',
  Charged,
  async (message, ctx) => {
    const { key, seq, at, kind } = message.data;
    if (ctx.attempt === 1) {
      const ms = performance.now() - at;
      interval.add(ms);
      overall.add(ms);
      if (measuringSteady) steady.add(ms);
    }
    if (kind === 'flaky' && ctx.attempt === 1) throw new Error('soak: a transient failure');
    if (seq % 10 === 0) await ctx.tx.query('select $1::text as charged', [message.id]);
    billing.record(key, seq);
    if (kind === 'poison') return deadLetter('soak: poison');
    return undefined;
  },
  { retry: { immediate: 1, delayed: [100], jitter: 0 } },
);
consumer.subscribe('audit', Charged, (message) => {
  audit.record(message.data.key, message.data.seq);
});

await consumer.start();
await producer.start();
const retention = new Retention(publisherBackbone.driver, {
  schema,
  intervalMs: 2_000,
  batchSize: 1_000,
  log: { maxAgeMs: 10_000 },
  inbox: { maxAgeMs: 15_000 },
  deadLetters: { maxAgeMs: 15_000 },
  vacuum: true,
  onWarning,
  onRun: (result: PruneResult) => {
    retentionRuns++;
    retentionDeleted = {
      log: retentionDeleted.log + result.log.deleted,
      inbox: retentionDeleted.inbox + result.inbox.deleted,
      deadLetters: retentionDeleted.deadLetters + result.deadLetters.deleted,
    };
  },
});
retention.start();

// ---- the load ------------------------------------------------------------------------------------

const pad = 'x'.repeat(payloadBytes);
const keys = Array.from({ length: keyCount }, (_, i) => `customer-${i}`);
let running = true;
const started = performance.now();
const loops = Array.from({ length: publishers }, async (_, p) => {
  const mine = keys.filter((_key, i) => i % publishers === p);
  if (mine.length === 0) return;
  const seqs = new Map(mine.map((key) => [key, 0]));
  const period = rate > 0 ? (1_000 * publishers) / rate : 0;
  let n = 0;
  let due = started + Math.random() * period;
  while (running) {
    if (period > 0) {
      const wait = due - performance.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      due += period;
    }
    const key = mine[n++ % mine.length]!;
    const seq = seqs.get(key)!;
    seqs.set(key, seq + 1);
    const total = published + publishErrors;
    const kind = total % 1_000 === 999 ? 'poison' : total % 200 === 199 ? 'flaky' : 'ok';
    try {
      await producer.publish(Charged, { key, seq, at: performance.now(), kind, pad });
      lastPublished.set(key, seq);
      published++;
    } catch (error) {
      failed.add(`${key}:${seq}`);
      publishErrors++;
      lastPublishError = error instanceof TidingsError ? `${error.code}: ${error.message}` : String(error);
    }
  }
});

// ---- reporting -----------------------------------------------------------------------------------

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;
const admin = new pg.Client({ connectionString: url });
await admin.connect();
const mb = (bytes: number) => `${(bytes / 1_048_576).toFixed(1)} MB`;
const ms = (value: number) => (value < 10 ? value.toFixed(1) : Math.round(value).toString());
async function tableSizes(): Promise<{ log: number; inbox: number; dead: number }> {
  const { rows } = await admin.query(
    `select pg_total_relation_size($1::regclass)::int8 as log, pg_total_relation_size($2::regclass)::int8 as inbox, pg_total_relation_size($3::regclass)::int8 as dead`,
    [`"${schema}".log`, `"${schema}".inbox`, `"${schema}".dead_letters`],
  );
  return { log: Number(rows[0].log), inbox: Number(rows[0].inbox), dead: Number(rows[0].dead) };
}

const warmUpSeconds = Math.max(10, Math.round(seconds / 4));
let warm: { rss: number; heap: number } | undefined;
const sizes: Array<{ at: number; log: number; inbox: number; dead: number }> = [];
console.log(
  `soak: ${seconds} s on ${url.replace(/:[^:@/]*@/, '@')}, schema ${schema}; ${rate > 0 ? `${rate} messages/s` : 'as fast as possible'} from ${publishers} publishers on ${keyCount} keys, ${payloadBytes} B payloads; 2 subscriptions; retention every 2 s (log 10 s, inbox and dead letters 15 s)`,
);
let previous = { at: started, published: 0, handled: 0 };
const tick = 5_000;
for (let elapsed = tick; elapsed <= seconds * 1_000; elapsed += tick) {
  const wait = started + elapsed - performance.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
  const now = performance.now();
  const span = (now - previous.at) / 1_000;
  const memory = process.memoryUsage();
  const size = await tableSizes();
  sizes.push({ at: elapsed / 1_000, ...size });
  console.log(
    [
      `${String(elapsed / 1_000).padStart(4)} s`,
      `published ${Math.round((published - previous.published) / span)}/s`,
      `handled ${Math.round((billing.handled - previous.handled) / span)}/s`,
      `latency p50 ${ms(interval.percentile(50))} p99 ${ms(interval.percentile(99))} max ${ms(interval.max)} ms`,
      `rss ${mb(memory.rss)} heap ${mb(memory.heapUsed)}`,
      `log ${mb(size.log)} inbox ${mb(size.inbox)} dead_letters ${mb(size.dead)}`,
      `lag ${published - billing.handled}`,
    ].join(' | '),
  );
  interval.reset();
  previous = { at: now, published, handled: billing.handled };
  if (warm === undefined && elapsed >= warmUpSeconds * 1_000) {
    gc();
    warm = { rss: process.memoryUsage().rss, heap: process.memoryUsage().heapUsed };
    console.log(`       after warm-up (${warmUpSeconds} s), collected: rss ${mb(warm.rss)} heap ${mb(warm.heap)}`);
    measuringSteady = true;
  }
}

// ---- the end -------------------------------------------------------------------------------------

const loadSeconds = (performance.now() - started) / 1_000;
gc();
const end = { rss: process.memoryUsage().rss, heap: process.memoryUsage().heapUsed };
running = false;
await Promise.all(loops);
const drainStarted = performance.now();
while ((billing.missing() > 0 || audit.missing() > 0) && performance.now() - drainStarted < 60_000) {
  await new Promise((resolve) => setTimeout(resolve, 100));
}
const drainMs = performance.now() - drainStarted;
const lost = { billing: billing.missing(), audit: audit.missing() };
await retention.stop();
await consumer.stop();
await producer.stop();
const { rows: dead } = await admin.query(`select count(*)::int as n from "${schema}".dead_letters`);
if (!args.keep) await admin.query(`drop schema "${schema}" cascade`);
await admin.end();

const problems: string[] = [];
if (lost.billing > 0 || lost.audit > 0)
  problems.push(`lost messages: billing ${lost.billing}, audit ${lost.audit} (not handled ${Math.round(drainMs / 1_000)} s after publishing stopped)`);
const violations = [...billing.violations, ...audit.violations];
if (violations.length > 0) problems.push(`out of order or skipped: ${violations.slice(0, 5).join('; ')}`);
if (warm === undefined) problems.push(`the run was shorter than the warm-up (${warmUpSeconds} s): no memory baseline`);
else {
  if (end.rss > warm.rss * 1.5) problems.push(`RSS grew from ${mb(warm.rss)} after warm-up to ${mb(end.rss)} (bound: 1.5x)`);
  const heapBound = warm.heap + 16 * 1_048_576 + warm.heap * 0.25;
  if (end.heap > heapBound) problems.push(`heap after GC grew from ${mb(warm.heap)} after warm-up to ${mb(end.heap)} (bound: ${mb(heapBound)})`);
}
const half = sizes.filter((s) => s.at > seconds / 2);
const firstHalf = sizes.filter((s) => s.at >= warmUpSeconds && s.at <= seconds / 2);
const levelled = (pick: (s: (typeof sizes)[number]) => number) =>
  firstHalf.length === 0 || half.length === 0 ? 'n/a' : `${mb(Math.max(...firstHalf.map(pick)))} -> ${mb(Math.max(...half.map(pick)))}`;

console.log('');
console.log(
  `summary: ${published} published in ${loadSeconds.toFixed(0)} s (${Math.round(published / loadSeconds)}/s), ${publishErrors} publish errors${publishErrors > 0 ? ` (last: ${lastPublishError})` : ''}`,
);
console.log(
  `  handled: billing ${billing.handled} (${billing.duplicates} redelivered), audit ${audit.handled} (${audit.duplicates} redelivered); ${dead[0].n} dead letters left; drained in ${Math.round(drainMs)} ms`,
);
console.log(
  `  latency publish -> handler (first attempts): after warm-up p50 ${ms(steady.percentile(50))} ms, p99 ${ms(steady.percentile(99))} ms, max ${ms(steady.max)} ms; whole run p50 ${ms(overall.percentile(50))} ms, p99 ${ms(overall.percentile(99))} ms, max ${ms(overall.max)} ms`,
);
if (warm !== undefined) console.log(`  memory (after GC): rss ${mb(warm.rss)} -> ${mb(end.rss)}, heap ${mb(warm.heap)} -> ${mb(end.heap)} (warm-up -> end)`);
console.log(
  `  table sizes, largest in the first half after warm-up -> in the second half: log ${levelled((s) => s.log)}, inbox ${levelled((s) => s.inbox)}, dead_letters ${levelled((s) => s.dead)}`,
);
console.log(
  `  retention: ${retentionRuns} runs deleted ${retentionDeleted.log} log rows, ${retentionDeleted.inbox} inbox records, ${retentionDeleted.deadLetters} dead letters`,
);
if (warnings.size > 0) console.log(`  warnings: ${[...warnings].map(([message, count]) => `${count}x ${message}`).join('; ')}`);
if (problems.length > 0) {
  console.log(`FAILED: ${problems.join('; ')}`);
  process.exitCode = 1;
} else {
  console.log('OK: nothing lost, order kept, memory flat');
}
