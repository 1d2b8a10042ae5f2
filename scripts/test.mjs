/**
 * `npm test`: every test file, in two lanes run side by side, each lane one file at a time. Most files spend
 * their time waiting (on a server, a timer, a child process), so two lanes take about half the time of one.
 * A lane runs its files one at a time because files of one kind share a server in ways that do not mix: a
 * RabbitMQ test stops the broker's app, PostgreSQL tests cut their connections and count rows under load.
 *
 * - lane `pg`: the tests on the PostgreSQL server (`*.pg.test.ts`);
 * - lane `other`: units, embedded PostgreSQL, memory, the brokers (`*.rabbitmq`, `*.nats`, `*.brokers`), the package.
 *
 * Each lane's output goes through with its name before each line; the last lines sum both lanes up.
 * `node scripts/test.mjs test/a.test.ts test/b.pg.test.ts` runs only those files, in their lanes.
 */
import { spawn } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { createInterface } from 'node:readline';

const chosen = process.argv.slice(2);
const files =
  chosen.length > 0
    ? chosen
    : readdirSync('test')
        .filter((file) => file.endsWith('.test.ts'))
        .sort()
        .map((file) => `test/${file}`);
const lanes = [
  { name: 'pg', files: files.filter((file) => file.endsWith('.pg.test.ts')) },
  { name: 'other', files: files.filter((file) => !file.endsWith('.pg.test.ts')) },
].filter((lane) => lane.files.length > 0);

const SUMMARY = /^# (tests|suites|pass|fail|cancelled|skipped|todo|duration_ms) ([\d.]+)$/;

/** Runs one lane; resolves to its exit code and its summary counts. */
function runLane({ name, files: laneFiles }) {
  const child = spawn(
    process.execPath,
    ['--conditions=tidings-source', '--import', 'tsx', '--test', '--test-concurrency=1', '--test-reporter=tap', ...laneFiles],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const counts = {};
  const prefix = `[${name}] `;
  createInterface({ input: child.stdout }).on('line', (line) => {
    const summary = SUMMARY.exec(line);
    if (summary !== null) counts[summary[1]] = Number(summary[2]);
    process.stdout.write(`${prefix}${line}\n`);
  });
  createInterface({ input: child.stderr }).on('line', (line) => process.stderr.write(`${prefix}${line}\n`));
  return new Promise((resolve) => child.on('close', (code, signal) => resolve({ name, code: code ?? (signal === null ? 1 : 128), counts })));
}

const started = Date.now();
const results = await Promise.all(lanes.map(runLane));
const sum = (key) => results.reduce((total, lane) => total + (lane.counts[key] ?? 0), 0);
const failed = results.filter((lane) => lane.code !== 0);
process.stdout.write(
  [
    '',
    `# all lanes: ${results.map((lane) => `${lane.name} ${lane.code === 0 ? 'passed' : `failed (exit ${lane.code})`}`).join(', ')}`,
    `# tests ${sum('tests')}`,
    `# pass ${sum('pass')}`,
    `# fail ${sum('fail')}`,
    `# cancelled ${sum('cancelled')}`,
    `# skipped ${sum('skipped')}`,
    `# todo ${sum('todo')}`,
    `# wall time ${Math.round((Date.now() - started) / 1000)} s`,
    '',
  ].join('\n'),
);
process.exitCode = failed.length > 0 ? 1 : 0;
