/**
 * Group commit: the requests that arrive while earlier ones are being run are run together, by one call.
 * Calls start at the end of the event loop's turn, not at once: the callers one call resolves usually submit
 * again in that same turn, and would otherwise leave alone in a call of their own while the rest wait for
 * the next (10 publishers: ~3 messages per write instead of 10, and half the rate). At most `inFlight` calls
 * run at once; each takes what waits, up to `maxBatch` by `weight` (a first request heavier than that goes
 * alone). Like a Kafka producer's linger, with no timer: a lone request waits for nothing but the turn's end.
 */
interface BatcherOptions<In> {
  /** Calls running at once; while they run, new requests gather into the next. */
  readonly inFlight: number;
  /** Most weight one call takes. */
  readonly maxBatch?: number;
  /** A request's weight (default 1). */
  readonly weight?: (item: In) => number;
}

interface Waiting<In, Out> {
  readonly item: In;
  readonly resolve: (out: Out) => void;
  readonly reject: (error: unknown) => void;
}

export class Batcher<In, Out> {
  readonly #queue: Waiting<In, Out>[] = [];
  readonly #run: (items: In[]) => Promise<Out[]>;
  readonly #inFlightMax: number;
  readonly #maxBatch: number;
  readonly #weight: (item: In) => number;
  #inFlight = 0;
  #scheduled = false;

  /** `run` returns one result per item, in order; if it throws, every request of the call fails with it. */
  constructor(run: (items: In[]) => Promise<Out[]>, options: BatcherOptions<In>) {
    this.#run = run;
    this.#inFlightMax = options.inFlight;
    this.#maxBatch = options.maxBatch ?? Number.POSITIVE_INFINITY;
    this.#weight = options.weight ?? (() => 1);
  }

  submit(item: In): Promise<Out> {
    return new Promise<Out>((resolve, reject) => {
      this.#queue.push({ item, resolve, reject });
      this.#schedule();
    });
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      this.#drain();
    });
  }

  #drain(): void {
    while (this.#inFlight < this.#inFlightMax && this.#queue.length > 0) {
      const batch: Waiting<In, Out>[] = [];
      let weight = 0;
      while (this.#queue.length > 0 && (batch.length === 0 || weight + this.#weight(this.#queue[0]!.item) <= this.#maxBatch)) {
        const next = this.#queue.shift()!;
        batch.push(next);
        weight += this.#weight(next.item);
      }
      this.#inFlight++;
      void this.#flush(batch);
    }
  }

  async #flush(batch: Waiting<In, Out>[]): Promise<void> {
    try {
      const outs = await this.#run(batch.map((waiting) => waiting.item));
      for (const [i, waiting] of batch.entries()) waiting.resolve(outs[i]!);
    } catch (error) {
      for (const waiting of batch) waiting.reject(error);
    } finally {
      this.#inFlight--;
      this.#schedule();
    }
  }
}
