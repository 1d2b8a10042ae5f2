/**
 * The benchmark's plan and goals (bench/harness): the broker drains run cold and steady (issue 24: >= 100,000
 * after a warm-up), G9 judges the steady ones, and the full run has the 1,000,000 backlog with a watchdog
 * that lets it finish.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BROKERS, coldLabel, steadyLabel } from '../bench/harness/brokers.ts';
import { FULL, QUICK, steps, taskFor } from '../bench/harness/plan.ts';
import type { Entry } from '../bench/harness/report.ts';
import { checkTargets } from '../bench/harness/targets.ts';

const db = { url: 'postgres://127.0.0.1/bench', name: 'bench' };

function tasksOf(quick: boolean, workload: string, label: string) {
  const sizes = quick ? QUICK : FULL;
  return steps(quick, sizes)
    .filter((step) => step.workload === workload)
    .flatMap((step) => step.rows.filter((row) => row.label === label).map((row) => taskFor(row, step.workload, sizes, db, quick, 1)));
}

test('each broker drains cold (10,000, no warm-up) and steady (100,000 after 20,000), Tidings and the plain client alike', () => {
  for (const broker of BROKERS) {
    for (const label of [broker.tidings, broker.plain]) {
      const [cold] = tasksOf(false, 'drain', coldLabel(label));
      const [steady] = tasksOf(false, 'drain', steadyLabel(label));
      assert.deepEqual([cold?.events, cold?.warmUpEvents], [10_000, 0], coldLabel(label));
      assert.deepEqual([steady?.events, steady?.warmUpEvents], [100_000, 20_000], steadyLabel(label));
      assert.ok(steady !== undefined && steady.timeoutMs > cold!.timeoutMs, 'the steady row has a longer watchdog');
    }
  }
});

test('the full run drains a 1,000,000 backlog, with a watchdog longer than the default', () => {
  const [task] = tasksOf(false, 'backlog', 'Tidings, backlog 1,000,000');
  assert.equal(task?.events, 1_000_000);
  assert.ok(task.timeoutMs > FULL.timeoutMs);
  assert.equal(tasksOf(true, 'backlog', 'Tidings, backlog 1,000,000').length, 0, 'not in --quick');
});

test('G9 judges the steady drain and e2e; the cold drain is shown beside, not judged', () => {
  const entry = (workload: Entry['workload'], label: string, rate: number): Entry => ({
    workload,
    row: { system: 'rabbitmq', label, variant: { keys: 0, effects: false, inbox: true }, group: 'rabbitmq' },
    runs: [],
    summary: { rate: { median: rate, min: rate, max: rate, n: 1 } },
  });
  const rabbit = BROKERS[0];
  const entries = [
    entry('drain', coldLabel(rabbit.tidings), 2_000),
    entry('drain', coldLabel(rabbit.plain), 10_000),
    entry('drain', steadyLabel(rabbit.tidings), 9_500),
    entry('drain', steadyLabel(rabbit.plain), 10_000),
    entry('e2e', rabbit.tidings, 1_000),
    entry('e2e', rabbit.plain, 1_000),
  ];
  const g9 = checkTargets(entries).find((check) => check.id === `G9 ${rabbit.name}`);
  assert.equal(g9?.value, '95 %, 100 % (20 %)');
  assert.equal(g9?.verdict, 'met');
});
