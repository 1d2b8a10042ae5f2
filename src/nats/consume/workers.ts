/**
 * Which topics a subscription has, as its workers say (issue 18, defect 0: a rolling deploy). Each worker
 * announces the topics it has handlers for in its entry of the leases bucket, and on start writes them as the
 * subscription's newest worker's (`<subscription>.newest` in the holds bucket, which does not expire). The
 * subscription's topics are those of its live workers and of its newest worker, alive or not, together (as on
 * PostgreSQL, README "Adding or removing a handler"). A topic none of them handles is not the subscription's
 * (removing a handler everywhere stops its delivery); one that is, a worker without a handler for it never
 * acknowledges, dead-letters or skips: it leaves the message, and its key, to a live worker that can, or holds
 * it until one runs again. The buckets go to the workers that handle every topic (test/deploy.nats.test.ts).
 */
import { EVERY_TOPIC } from '../../core/backbone.ts';

/** What a worker handles: topic names, every topic, or unknown (an entry written by an older Tidings). */
type Handles = ReadonlySet<string> | 'every' | 'unknown';

export interface LiveWorker {
  readonly owner: string;
  readonly handles: Handles;
}

/** A worker's entry in the leases bucket. */
export function announcement(topics: readonly string[]): string {
  return JSON.stringify({ topics: [...topics].sort() });
}

export function readAnnouncement(owner: string, value: string): LiveWorker {
  try {
    const { topics } = JSON.parse(value) as { topics?: unknown };
    if (Array.isArray(topics) && topics.every((topic) => typeof topic === 'string')) {
      return { owner, handles: topics.includes(EVERY_TOPIC) ? 'every' : new Set(topics) };
    }
  } catch {
    // an older entry: the owner's id as text
  }
  return { owner, handles: 'unknown' };
}

/** The live workers of one subscription and its newest worker, read at one moment. */
export class WorkerView {
  readonly workers: readonly LiveWorker[];
  /** The last worker started, alive or not (undefined before any worker of this version started). */
  readonly newest: LiveWorker | undefined;
  /** The subscription's topics: every topic one of its live workers, or its newest worker, handles. */
  readonly topics: ReadonlySet<string> | 'every';
  /** The live workers that handle every one of those topics; an unknown worker is taken to (it follows no rule). */
  readonly complete: readonly LiveWorker[];

  constructor(workers: readonly LiveWorker[], newest: LiveWorker | undefined) {
    this.workers = [...workers].sort((a, b) => a.owner.localeCompare(b.owner));
    this.newest = newest;
    const union = new Set<string>();
    let every = false;
    for (const { handles } of newest === undefined ? this.workers : [...this.workers, newest]) {
      if (handles === 'every') every = true;
      else if (handles !== 'unknown') for (const topic of handles) union.add(topic);
    }
    this.topics = every ? 'every' : union;
    this.complete = this.workers.filter(
      ({ handles }) => handles === 'unknown' || handles === 'every' || (this.topics !== 'every' && [...union].every((topic) => handles.has(topic))),
    );
  }

  /** Whether `topic` is the subscription's. */
  has(topic: string): boolean {
    return this.topics === 'every' || this.topics.has(topic);
  }

  /** The live workers with a handler for `topic`. */
  handlersOf(topic: string): LiveWorker[] {
    return this.workers.filter(({ handles }) => handles === 'every' || (handles !== 'unknown' && handles.has(topic)));
  }

  isComplete(owner: string): boolean {
    return this.complete.some((worker) => worker.owner === owner);
  }

  /** Undefined when every live worker handles the same topics; else who handles what, for a warning. */
  disagreement(): string | undefined {
    const described = this.workers.map(({ owner, handles }) => `${owner} handles ${describe(handles)}`);
    if (new Set(this.workers.map(({ handles }) => describe(handles))).size <= 1) return undefined;
    return described.join('; ');
  }
}

function describe(handles: Handles): string {
  if (handles === 'every') return 'every topic';
  if (handles === 'unknown') return 'unknown topics (an older Tidings)';
  return [...handles].sort().join(', ');
}
