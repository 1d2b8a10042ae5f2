/**
 * Pull requests on a durable JetStream consumer, through one inbox subscription that stays open for as long
 * as the bucket is held.
 *
 * Why not nats.js `consumer.fetch()`: it closes its inbox on a client-side timer (expires x 1.05) that starts
 * before the request is even sent. When the request reaches the server late (a loaded machine), the server
 * still holds it after the client stopped listening, and the messages it delivers in that window are lost in
 * the client. JetStream counts them delivered and redelivers them only after ack_wait, after the next pull has
 * handed out later messages of their keys: per-key order breaks. Here a request is over only when the server
 * says so (status 408/404/409 on the request's own reply subject) or when all its messages arrived, and the
 * subscription is closed only once every request is over.
 */
import type { Msg, MsgHdrs, NatsConnection, Subscription } from '@nats-io/transport-node';
import { client } from '../client.ts';

const ACK = Uint8Array.of(0x2b, 0x41, 0x43, 0x4b); // +ACK
const NAK = Uint8Array.of(0x2d, 0x4e, 0x41, 0x4b); // -NAK
const WPI = Uint8Array.of(0x2b, 0x57, 0x50, 0x49); // +WPI
const TERM = Uint8Array.of(0x2b, 0x54, 0x45, 0x52, 0x4d); // +TERM

/**
 * A message JetStream delivered to one of our pull requests. Its reply subject carries the delivery's
 * metadata ($JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<deliveries>.<stream seq>.<consumer seq>.<ns>.<pending>)
 * and takes the acknowledgement.
 */
export class Delivered {
  readonly #msg: Msg;
  /** Stream sequence. */
  readonly seq: number;
  /** Consumer (delivery) sequence: +1 for every delivery the consumer makes, to anyone. */
  readonly deliverySeq: number;
  /** Times JetStream delivered this message, this one included. */
  readonly deliveries: number;
  readonly timestampNanos: number;

  constructor(msg: Msg) {
    this.#msg = msg;
    const tokens = (msg.reply ?? '').split('.');
    if (tokens.length === 9) tokens.splice(2, 0, '_', '');
    if (tokens.length < 11 || tokens[0] !== '$JS' || tokens[1] !== 'ACK')
      throw new Error(`not a JetStream delivery: reply subject ${JSON.stringify(msg.reply)}`);
    this.deliveries = Number(tokens[6]);
    this.seq = Number(tokens[7]);
    this.deliverySeq = Number(tokens[8]);
    this.timestampNanos = Number(tokens[9]);
  }

  get subject(): string {
    return this.#msg.subject;
  }

  get headers(): MsgHdrs | undefined {
    return this.#msg.headers;
  }

  get data(): Uint8Array {
    return this.#msg.data;
  }

  ack(): void {
    this.#msg.respond(ACK);
  }

  nak(): void {
    this.#msg.respond(NAK);
  }

  /** Resets the ack wait: still being worked on. */
  working(): void {
    this.#msg.respond(WPI);
  }

  term(): void {
    this.#msg.respond(TERM);
  }
}

interface Request {
  remaining: number;
  readonly overlap: NodeJS.Timeout;
  readonly linger: NodeJS.Timeout;
  readonly done: () => void;
  readonly fail: (error: Error) => void;
}

/**
 * The next request goes out this long before the current one expires, if it is still open then, so one is
 * always waiting on the server. nats-server 2.9 now and then drops a request that was nearly served, with no
 * status and no more messages: a lane that pulled again only when told its request was over stalled until
 * the request's linger (~3 s at 500 messages/s, one request in ~20).
 */
const OVERLAP_MS = 250;

interface PullerOptions {
  readonly nc: NatsConnection;
  readonly stream: string;
  readonly durable: string;
  /** Every delivery, in the order it arrives; called synchronously from the subscription. */
  readonly onMessage: (delivery: Delivered) => void;
}

export class Puller {
  readonly #options: PullerOptions;
  readonly #inbox = client().transport.createInbox();
  readonly #sub: Subscription;
  /** Requests in the order sent; the server serves a consumer's waiting requests in that order too. */
  readonly #requests = new Map<string, Request>();
  #next = 0;
  readonly #settled = new Set<Promise<void>>();

  constructor(options: PullerOptions) {
    this.#options = options;
    this.#sub = options.nc.subscribe(`${this.#inbox}.*`, { callback: (error, msg) => this.#arrived(error, msg) });
  }

  /**
   * Asks for up to `batch` messages, waiting up to `expiresMs` on the server; resolves when the server ended
   * the request, all of them arrived, or it is about to expire (see OVERLAP_MS). Messages go to `onMessage`
   * as they arrive, whichever request they answer.
   */
  pull(batch: number, expiresMs: number): Promise<void> {
    const { nc, stream, durable } = this.#options;
    const reply = `${this.#inbox}.${++this.#next}`;
    const lingerMs = 2 * expiresMs + 1_000;
    let pulled!: { resolve: () => void; reject: (error: Error) => void };
    const answer = new Promise<void>((resolve, reject) => {
      pulled = { resolve, reject };
    });
    // Settles when the request is over on the server too: what `close` waits for.
    const over = new Promise<void>((settle) => {
      const finish = (): void => {
        clearTimeout(request.overlap);
        clearTimeout(request.linger);
        this.#requests.delete(reply);
        settle();
      };
      const request: Request = {
        remaining: batch,
        overlap: setTimeout(() => pulled.resolve(), Math.max(0, expiresMs - OVERLAP_MS)),
        // Not heard of for much longer: its status was lost (a reconnection), or the server dropped it.
        linger: setTimeout(finish, lingerMs),
        done: () => {
          finish();
          pulled.resolve();
        },
        fail: (error) => {
          finish();
          pulled.reject(error);
        },
      };
      this.#requests.set(reply, request);
      try {
        nc.publish(`$JS.API.CONSUMER.MSG.NEXT.${stream}.${durable}`, JSON.stringify({ batch, expires: client().transport.nanos(expiresMs) }), { reply });
      } catch (error) {
        request.fail(error as Error);
      }
    });
    this.#settled.add(over);
    void over.then(() => this.#settled.delete(over));
    return answer;
  }

  #arrived(error: Error | null, msg: Msg): void {
    if (error !== null) {
      for (const request of [...this.#requests.values()]) request.fail(error);
      return;
    }
    if (msg.subject.startsWith(`${this.#inbox}.`)) {
      this.#status(msg);
      return;
    }
    // A delivery: it counts against the oldest open request, the one the server is serving.
    const oldest = this.#requests.values().next().value;
    if (oldest !== undefined && --oldest.remaining <= 0) oldest.done();
    let delivery: Delivered;
    try {
      delivery = new Delivered(msg);
    } catch {
      return; // not from JetStream (someone published to our inbox): nothing to acknowledge
    }
    this.#options.onMessage(delivery);
  }

  /** A status the server sent to one request's reply subject: its end, or a heartbeat. */
  #status(msg: Msg): void {
    const request = this.#requests.get(msg.subject);
    const code = msg.headers?.code ?? 0;
    if (request === undefined || code === 100) return; // idle heartbeat, or a request already over
    const description = msg.headers?.description ?? '';
    // 408 request expired, 404 no messages, 409 leadership change or a limit: over, pull again. Anything else
    // (503 no responders: no such consumer or no JetStream; 409 consumer deleted) is a failure to report.
    if (code === 408 || code === 404 || (code === 409 && !/consumer deleted/i.test(description))) request.done();
    else request.fail(new Error(`JetStream ended pull request on ${this.#options.stream} > ${this.#options.durable}: ${code} ${description}`.trim()));
  }

  /** Waits until every request is over (nothing more can arrive), then closes the inbox. */
  async close(): Promise<void> {
    await Promise.all([...this.#settled]);
    this.#sub.unsubscribe();
  }
}
