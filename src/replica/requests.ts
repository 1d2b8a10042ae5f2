import type { Bus } from '../core/bus.ts';
import { TidingsError } from '../core/errors.ts';
import type { requestContract, ReplicaReply, ReplicaRequest } from './protocol.ts';

/** Messages a drift check or rebuild exchanged with the source: requests published, reply parts received. */
export interface Traffic {
  sent: number;
  received: number;
}

interface Pending {
  readonly parts: Map<number, ReplicaReply>;
  expected: number;
  resolve(replies: ReplicaReply[]): void;
  reject(error: unknown): void;
  timer: NodeJS.Timeout;
}

/**
 * A replica's request/reply client to its source, over the bus: publishes requests and waits for every part
 * of every answer (the source splits large ones), or fails after `timeoutMs` naming what to check.
 */
export class SourceRequests {
  readonly #pending = new Map<string, Pending>();

  constructor(
    /** Publishes the requests: the replica's bus. */
    private readonly publish: Bus<unknown>['publishMany'],
    private readonly replica: string,
    private readonly source: string,
    private readonly contract: ReturnType<typeof requestContract>,
    private readonly timeoutMs: number,
  ) {}

  /** A reply part from the source (the replica's replies subscription hands them here). */
  received(reply: ReplicaReply): void {
    const pending = this.#pending.get(reply.requestId);
    // An answer to a request this process no longer waits for (a restart, a timeout): nothing to do.
    if (pending === undefined) return;
    pending.parts.set(reply.part, reply);
    pending.expected = reply.parts;
    if (pending.parts.size >= pending.expected) {
      clearTimeout(pending.timer);
      this.#pending.delete(reply.requestId);
      pending.resolve([...pending.parts.values()].sort((a, b) => a.part - b.part));
    }
  }

  /** Publishes requests and waits for every part of every answer. */
  async ask(requests: ReplicaRequest[], traffic: Traffic): Promise<ReplicaReply[][]> {
    const answers = requests.map(
      (request) =>
        new Promise<ReplicaReply[]>((resolve, reject) => {
          const timer = setTimeout(() => {
            this.#pending.delete(request.requestId);
            reject(
              new TidingsError(
                'SOURCE_UNAVAILABLE',
                `Replica ${this.replica}: ${this.source} did not answer request ${request.requestId} (${request.kind}) on ${this.contract.topic} within ${this.timeoutMs} ms. Is the source service running with source(bus, ...) for ${this.source}? Check its subscription replica-source.${this.source} in tidings status and its dead letters.`,
              ),
            );
          }, this.timeoutMs);
          this.#pending.set(request.requestId, { parts: new Map(), expected: Number.POSITIVE_INFINITY, resolve, reject, timer });
        }),
    );
    // Registered before publishing: an answer can arrive before publishMany returns.
    for (const answer of answers) answer.catch(() => undefined);
    await this.publish(this.contract, requests);
    traffic.sent += requests.length;
    const replies = await Promise.all(answers);
    for (const parts of replies) traffic.received += parts.length;
    return replies;
  }

  /** Fails every request still waiting. */
  stop(): void {
    for (const [id, pending] of this.#pending) {
      clearTimeout(pending.timer);
      pending.reject(new TidingsError('STOPPED', `Replica ${this.replica} stopped while request ${id} waited for ${this.source}`));
    }
    this.#pending.clear();
  }
}
