/** Request/reply on the memory backbone: the requests waited for, by id, and their answers. */
import type { Reply } from '../core/backbone.ts';
import type { MemoryTransaction } from './transaction.ts';

interface Awaiting {
  resolve: (reply: Reply) => void;
  late: () => void;
  gone?: boolean;
}

export class MemoryReplies {
  readonly #awaiting = new Map<string, Awaiting>();

  /** Records a request's answer: with `tx`, when it commits (so it exists iff the request is acknowledged). */
  reply(requestId: string, reply: Reply, tx?: MemoryTransaction): void {
    // As JSON carries it, like every message here.
    const copy: Reply = reply.data === undefined ? reply : { data: JSON.parse(JSON.stringify(reply.data)) as unknown };
    // Nobody waits for the answer to a command sent without request: it is dropped (the first answer stands).
    const deliver = () => {
      const waiting = this.#awaiting.get(requestId);
      if (waiting === undefined) return;
      this.#awaiting.delete(requestId);
      if (waiting.gone === true) waiting.late();
      else waiting.resolve(copy);
    };
    if (tx === undefined) deliver();
    else tx.onCommit(deliver);
  }

  awaitReply(requestId: string, signal: AbortSignal, late: () => void): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      this.#awaiting.set(requestId, { resolve, late });
      signal.addEventListener(
        'abort',
        () => {
          const waiting = this.#awaiting.get(requestId);
          if (waiting !== undefined) this.#awaiting.set(requestId, { ...waiting, gone: true });
          reject(signal.reason);
          // An answer may still come within a minute: then it is counted as late.
          setTimeout(() => {
            if (this.#awaiting.get(requestId)?.gone === true) this.#awaiting.delete(requestId);
          }, 60_000).unref();
        },
        { once: true },
      );
    });
  }
}
