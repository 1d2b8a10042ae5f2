/**
 * `tidings status` for a person: one line per subscription, and detail only where something needs a look
 * (partitions behind, held keys, a lease that ran out, lag with no live worker). The replicas' request and
 * reply subscriptions, plumbing an operator rarely reads, fold into one line while they are healthy.
 * `--verbose` shows every partition and worker.
 */
import type { PartitionStatus, Status, SubscriptionStatus } from 'tidings/postgres';
import type { ReplicaStatus } from 'tidings/replica';
import { duration, lease, shortTime, table, type Column, type Style, type Tone } from './format.ts';

export interface StatusView {
  /** Every partition and worker, not only those in trouble. */
  readonly verbose: boolean;
  /** The terminal's width, if known: wide columns are cut to fit. */
  readonly width: number | undefined;
  readonly style: Style;
}

/** A subscription the replicas create for themselves (requests, replies), not one an application declared. */
function isReplicaPlumbing(name: string): boolean {
  return name.startsWith('replica-source.') || (name.startsWith('replica.') && name.endsWith('.replies'));
}

/** Partitions worth showing: behind, or held by a worker whose lease has run out. */
function troubled(cursor: PartitionStatus): boolean {
  return cursor.lag > 0 || (cursor.owner !== null && cursor.leaseRemainingMs !== null && cursor.leaseRemainingMs < 0);
}

/** What needs a look in a subscription, in words; empty when nothing does. */
function troubles(sub: SubscriptionStatus): string[] {
  const found: string[] = [];
  const live = sub.workers.filter((worker) => worker.live).length;
  const behind = sub.cursors.filter((cursor) => cursor.lag > 0).length;
  if (sub.lag > 0 && live === 0) found.push(`${sub.lag} message${sub.lag === 1 ? '' : 's'} waiting and no live worker`);
  else if (behind > 0) found.push(`${behind} of ${sub.partitions} partition${sub.partitions === 1 ? '' : 's'} behind`);
  if (sub.heldKeys > 0)
    found.push(`${sub.heldKeys} key${sub.heldKeys === 1 ? '' : 's'} held for a retry (${sub.heldMessages} message${sub.heldMessages === 1 ? '' : 's'})`);
  const expired = sub.cursors.filter((cursor) => cursor.owner !== null && cursor.leaseRemainingMs !== null && cursor.leaseRemainingMs < 0);
  if (expired.length > 0)
    found.push(
      `lease${expired.length === 1 ? '' : 's'} of partition${expired.length === 1 ? '' : 's'} ${expired.map((cursor) => cursor.partition).join(', ')} ran out`,
    );
  return found;
}

const lagTone = (lag: number, oldestMs: number | null): Tone | undefined => (lag === 0 ? undefined : oldestMs !== null && oldestMs > 60_000 ? 'bad' : 'warn');

export function renderStatus(status: Status, where: string, view: StatusView): string {
  const { style, width } = view;
  // OLDEST: the age of the oldest message not yet handled.
  const lines = [style.bold(`Schema ${status.schema} at ${where}, ${shortTime(status.at)}`), ''];
  if (status.subscriptions.length === 0) {
    lines.push('No subscriptions yet: they appear when a bus with subscribers starts.');
    return lines.join('\n');
  }
  const plumbing = status.subscriptions.filter((sub) => isReplicaPlumbing(sub.name));
  const quietPlumbing = !view.verbose && plumbing.every((sub) => troubles(sub).length === 0 && sub.deadLetters === 0);
  const shown = quietPlumbing ? status.subscriptions.filter((sub) => !isReplicaPlumbing(sub.name)) : status.subscriptions;
  const columns: Column<SubscriptionStatus>[] = [
    { header: 'subscription', value: (sub) => sub.name, shrink: 1 },
    { header: 'topics', value: (sub) => sub.topics.join(', '), max: 60, shrink: 2 },
    {
      header: 'workers',
      value: (sub) => sub.workers.filter((worker) => worker.live).length,
      tone: (sub) => (sub.lag > 0 && !sub.workers.some((w) => w.live) ? 'bad' : undefined),
    },
    { header: 'lag', value: (sub) => sub.lag, tone: (sub) => lagTone(sub.lag, sub.oldestUnprocessedAgeMs) },
    { header: 'oldest', value: (sub) => duration(sub.oldestUnprocessedAgeMs), align: 'right', tone: (sub) => lagTone(sub.lag, sub.oldestUnprocessedAgeMs) },
    { header: 'handled', value: (sub) => sub.handled },
    { header: 'held keys', value: (sub) => sub.heldKeys, tone: (sub) => (sub.heldKeys > 0 ? 'warn' : undefined) },
    { header: 'dead letters', value: (sub) => sub.deadLetters, tone: (sub) => (sub.deadLetters > 0 ? 'bad' : undefined) },
  ];
  lines.push(table(shown, columns, { width, style }));
  if (quietPlumbing && plumbing.length > 0) {
    const handled = plumbing.reduce((sum, sub) => sum + sub.handled, 0);
    lines.push(
      style.paint(
        'dim',
        `(and ${plumbing.length} replica request/reply subscription${plumbing.length === 1 ? '' : 's'}, all caught up, ${handled} handled: --verbose shows them)`,
      ),
    );
  }

  // A rolling deploy in progress (or stuck): always shown, it explains partitions that seem unowned.
  for (const sub of status.subscriptions) {
    for (const { worker, missing } of sub.disagreements) {
      lines.push(
        '',
        style.paint(
          'warn',
          `! ${sub.name}: worker ${worker} has no handler for ${missing.join(', ')}; it holds no partition until it has one or the subscription's topics change (a rolling deploy, until the old version's workers stop)`,
        ),
      );
    }
  }
  // Fair delivery at work: who is read apart is who floods the subscription.
  for (const sub of status.subscriptions) {
    if (sub.readApart.length === 0) continue;
    const tenants = sub.readApart.length > 10 ? `${sub.readApart.slice(0, 10).join(', ')} and ${sub.readApart.length - 10} more` : sub.readApart.join(', ');
    lines.push('', `${sub.name}: read apart by fair delivery (more than their share of a read): ${tenants}`);
  }
  for (const sub of status.subscriptions) {
    const found = troubles(sub);
    if (!view.verbose && (found.length === 0 || (quietPlumbing && isReplicaPlumbing(sub.name)))) continue;
    const cursors = view.verbose ? sub.cursors : sub.cursors.filter(troubled);
    lines.push(
      '',
      `${style.bold(sub.name)}: ${[`${sub.partitions} partition${sub.partitions === 1 ? '' : 's'}`, ...found.map((text) => style.paint('warn', text))].join('; ')}`,
    );
    if (cursors.length === 0) continue;
    lines.push(
      table(
        cursors,
        [
          { header: 'partition', value: (cursor) => cursor.partition },
          { header: 'owner', value: (cursor) => cursor.owner, shrink: 1 },
          {
            header: 'lease',
            value: (cursor) => lease(cursor.owner, cursor.leaseRemainingMs),
            tone: (cursor) => (cursor.owner !== null && cursor.leaseRemainingMs !== null && cursor.leaseRemainingMs < 0 ? 'bad' : undefined),
          },
          { header: 'epoch', value: (cursor) => cursor.epoch, align: 'right' },
          { header: 'handled', value: (cursor) => cursor.handled },
          { header: 'lag', value: (cursor) => cursor.lag, tone: (cursor) => lagTone(cursor.lag, cursor.oldestUnprocessedAgeMs) },
          { header: 'oldest', value: (cursor) => duration(cursor.oldestUnprocessedAgeMs), align: 'right' },
        ],
        { indent: '  ', width, style },
      ),
    );
  }

  const live = status.workers.filter((worker) => worker.live);
  const expired = status.workers.length - live.length;
  if (view.verbose) {
    lines.push('', 'Workers:');
    lines.push(
      status.workers.length === 0
        ? '  none registered'
        : table(
            status.workers,
            [
              { header: 'id', value: (worker) => worker.id, shrink: 1 },
              { header: 'subscription', value: (worker) => worker.subscription, shrink: 1 },
              { header: 'host', value: (worker) => worker.host, shrink: 1 },
              { header: 'pid', value: (worker) => worker.pid },
              { header: 'started', value: (worker) => shortTime(worker.startedAt) },
              { header: 'state', value: (worker) => (worker.live ? 'live' : 'expired'), tone: (worker) => (worker.live ? undefined : 'dim') },
              { header: 'topics', value: (worker) => worker.topics?.join(', ') ?? '?', max: 40, shrink: 2 },
            ],
            { indent: '  ', width, style },
          ),
    );
  } else {
    const hosts = new Set(live.map((worker) => `${worker.host}:${worker.pid}`)).size;
    lines.push(
      '',
      `Workers: ${live.length} live in ${hosts} process${hosts === 1 ? '' : 'es'}${expired > 0 ? `, ${expired} expired (gone without stopping; their leases move once they run out)` : ''}.`,
    );
  }

  const behind = status.subscriptions.filter((sub) => sub.lag > 0).length;
  const next: string[] = [];
  if (behind === 0 && status.heldKeys === 0) next.push(style.paint('good', 'Every subscription is caught up.'));
  if (status.deadLetters > 0)
    next.push(style.paint('bad', `${status.deadLetters} dead letter${status.deadLetters === 1 ? '' : 's'}: tidings dead-letters list --group`));
  if (!view.verbose) next.push(style.paint('dim', 'Every partition and worker: tidings status --verbose'));
  lines.push(...next);
  return lines.join('\n');
}

/** The replicas' table, under the subscriptions in `tidings status`, and alone in `tidings drift status`. */
export function renderReplicas(replicas: readonly ReplicaStatus[]): string {
  return [
    'Replicas',
    table(replicas, [
      { header: 'replica', value: (r) => r.name },
      { header: 'source', value: (r) => r.source },
      { header: 'rows', value: (r) => r.rows },
      { header: 'generation', value: (r) => (r.building === null ? r.generation : `${r.generation} (building ${r.building})`) },
      { header: 'last check', value: (r) => (r.checkedAt === null ? 'never' : shortTime(r.checkedAt)) },
      { header: 'missing', value: (r) => r.lastCheck?.missing ?? '' },
      { header: 'extra', value: (r) => r.lastCheck?.extra ?? '' },
      { header: 'different', value: (r) => r.lastCheck?.different ?? '' },
      { header: 'repaired', value: (r) => r.lastCheck?.repaired ?? '' },
    ]),
  ].join('\n');
}
