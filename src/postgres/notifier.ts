import { EVERY_TOPIC } from '../core/backbone.ts';
import type { ListenSession, SqlDriver } from './connection/driver.ts';

interface NotifierOptions {
  readonly channel: string;
  /** A ping after this long without traffic proves the connection is still alive. */
  readonly pingMs: number;
  readonly reconnectMinMs: number;
  readonly reconnectMaxMs: number;
  /** Told when the LISTEN connection is lost (`true`, with the error) and when it is back (`false`). */
  readonly connection?: (lost: boolean, error?: unknown) => void;
  /** How long the self-test waits for its own notification before deciding LISTEN does not work here. */
  readonly selfTestMs: number;
  readonly warn: (message: string, error?: unknown) => void;
  /**
   * Whether a consumer other than this backbone's own may be listening (see `othersListening`); absent:
   * assume one is.
   */
  readonly othersConsume?: () => Promise<boolean>;
}

/** How old the answer to "does anyone else consume?" may be before it is asked again. */
const AUDIENCE_MAX_AGE_MS = 1_000;

type Wake = (topics: ReadonlySet<string> | 'all') => void;

/**
 * One LISTEN connection per process (brandur's notifier pattern). Notifications only wake consumers: they
 * carry topic names, never messages, so a lost one costs latency and never correctness (consumers also
 * poll slowly, and every (re)connect wakes them all to catch up).
 *
 * Producers never NOTIFY inside their transactions: a NOTIFY takes a global lock at commit, and with many
 * writers it cut the commit rate by 72 % on our machine (research/performance.md). Instead, after a commit
 * the publishing process calls `poke`; pokes are coalesced so at most one NOTIFY is in flight per process.
 */
export class Notifier {
  readonly #driver: SqlDriver;
  readonly #options: NotifierOptions;
  readonly #listeners = new Set<{ topics: ReadonlySet<string>; wake: Wake }>();
  readonly #signals = new Map<string, Set<() => void>>();
  #session: ListenSession | undefined;
  #connecting: Promise<void> | undefined;
  #closed = false;
  #attempt = 0;
  #pingTimer: NodeJS.Timeout | undefined;
  #reconnectTimer: NodeJS.Timeout | undefined;
  #pending = new Set<string>();
  #sending = false;
  #selfTest: { token: string; resolve: () => void } | undefined;
  /** False when LISTEN is impossible here (say, behind a transaction-pooling proxy): consumers must poll. */
  listening = false;
  /** Marks the notifications this notifier caused, whichever connection sent them, so it can ignore them. */
  readonly #origin = Math.random().toString(36).slice(2, 10);
  #warnedUnavailable = false;
  #audience: { others: boolean; at: number; asking: boolean } = { others: true, at: 0, asking: false };

  constructor(driver: SqlDriver, options: NotifierOptions) {
    this.#driver = driver;
    this.#options = options;
  }

  /** Registers a consumer to wake when any of `topics` gets messages. Returns the unsubscribe function. */
  register(topics: readonly string[], wake: Wake): () => void {
    const entry = { topics: new Set(topics), wake };
    this.#listeners.add(entry);
    return () => this.#listeners.delete(entry);
  }

  /**
   * Registers for a named signal (`held:<subscription>`: held messages were added from outside, say by a
   * redrive). Signals travel as `!<name>` in the same payloads as topics.
   */
  onSignal(name: string, fn: () => void): () => void {
    let set = this.#signals.get(name);
    if (set === undefined) this.#signals.set(name, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  async start(): Promise<void> {
    this.#connecting ??= this.#connect();
    await this.#connecting;
  }

  /**
   * After a commit that published on `topics`: wake this process's consumers now, and others by NOTIFY
   * (unless the committed statement carried it already, see `payload`).
   */
  poke(topics: Iterable<string>, notified = false): void {
    const set = new Set(topics);
    if (set.size === 0) return;
    // Signals (`!name`) among them reach this process's handlers too, as a received notification's do.
    const topicsOnly = new Set<string>();
    for (const token of set) {
      if (token.startsWith('!')) this.#signal(token.slice(1));
      else topicsOnly.add(token);
    }
    if (topicsOnly.size > 0) this.#wakeLocal(topicsOnly);
    // Embedded too: other buses of this process may share the PGlite instance, each with its own notifier.
    // A signal goes out whoever consumes: its listener (a process waiting for a reply) may consume nothing.
    if (this.#closed || notified || (topicsOnly.size === set.size && !this.othersListening())) return;
    for (const topic of set) this.#pending.add(topic);
    void this.#send();
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#pingTimer);
    clearTimeout(this.#reconnectTimer);
    await this.#connecting?.catch(() => undefined);
    const session = this.#session;
    this.#session = undefined;
    await session?.close();
  }

  /**
   * Whether a NOTIFY may wake anyone: true if a consumer registered outside this process (a worker that is
   * not this notifier's) was seen at most a second ago. With nobody else consuming, a NOTIFY wakes nobody,
   * and it costs a transaction of its own (or makes the publishing one a notifying one, which serialises its
   * commit). The answer is cached and refreshed in the background, so a consumer starting elsewhere is
   * woken by NOTIFY within about a second; until then its backstop poll finds the messages.
   */
  othersListening(): boolean {
    const audience = this.#audience;
    const ask = this.#options.othersConsume;
    if (ask === undefined) return true;
    if (!audience.asking && Date.now() - audience.at > AUDIENCE_MAX_AGE_MS) {
      audience.asking = true;
      ask().then(
        (others) => {
          this.#audience = { others, at: Date.now(), asking: false };
        },
        () => {
          this.#audience = { others: true, at: Date.now(), asking: false };
        },
      );
    }
    return audience.others;
  }

  /**
   * The channel and payload of a NOTIFY waking other processes' consumers of `topics`, for a statement that
   * publishes to send itself: `select pg_notify(channel, payload)` in the same statement costs no round trip.
   */
  payload(topics: Iterable<string>): { channel: string; payload: string } {
    // Payloads are capped at 8,000 bytes: beyond that, wake everyone.
    let list = [...topics].join(',');
    if (list.length > 7_000) list = '*';
    return { channel: this.#options.channel, payload: `@${this.#origin} ${list}` };
  }

  async #send(): Promise<void> {
    if (this.#sending) return;
    this.#sending = true;
    try {
      while (this.#pending.size > 0 && !this.#closed) {
        const { payload } = this.payload(this.#pending);
        this.#pending.clear();
        try {
          if (this.#session !== undefined) await this.#session.notify(this.#options.channel, payload);
          else await this.#driver.query('select pg_notify($1, $2)', [this.#options.channel, payload]);
        } catch {
          // Consumers in other processes will poll; nothing is lost.
        }
      }
    } finally {
      this.#sending = false;
    }
  }

  #signal(name: string): void {
    for (const fn of this.#signals.get(name) ?? []) fn();
  }

  #wakeLocal(topics: ReadonlySet<string> | 'all'): void {
    for (const listener of this.#listeners) {
      if (topics === 'all') listener.wake('all');
      else {
        for (const topic of topics) {
          if (listener.topics.has(topic) || listener.topics.has(EVERY_TOPIC)) {
            listener.wake(topics);
            break;
          }
        }
      }
    }
  }

  async #connect(): Promise<void> {
    if (this.#closed) return;
    try {
      this.#session = await this.#driver.listen([this.#options.channel], {
        onNotification: (_channel, payload, fromSelf) => this.#onNotification(payload, fromSelf),
        onEnd: (error) => this.#onEnd(error),
      });
      if (this.#attempt > 0) this.#options.connection?.(false);
      this.#attempt = 0;
      this.listening = await this.#checkDelivery();
      if (!this.listening && !this.#warnedUnavailable) {
        this.#warnedUnavailable = true;
        this.#options.warn(`LISTEN/NOTIFY does not deliver on ${this.#driver.description} (a transaction-pooling proxy?); consumers fall back to polling`);
      }
      this.#schedulePing();
      // Anything committed while we were not listening would otherwise wait for the backstop poll.
      this.#wakeLocal('all');
    } catch (error) {
      this.listening = false;
      this.#scheduleReconnect(error);
    } finally {
      this.#connecting = undefined;
    }
  }

  /** Sends a notification to ourselves: if it never arrives, LISTEN does not work through this connection. */
  async #checkDelivery(): Promise<boolean> {
    if (this.#driver.embedded) return true;
    const token = `tidings-self-test-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const arrived = new Promise<void>((resolve) => {
      this.#selfTest = { token, resolve };
    });
    await this.#session?.notify(this.#options.channel, token);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), this.#options.selfTestMs);
    });
    const result = await Promise.race([arrived.then(() => true as const), timeout]);
    clearTimeout(timer);
    this.#selfTest = undefined;
    return result;
  }

  #onNotification(payload: string, fromSelf: boolean): void {
    if (this.#selfTest !== undefined && payload === this.#selfTest.token) {
      this.#selfTest.resolve();
      return;
    }
    if (payload.startsWith('tidings-self-test-')) return;
    this.#schedulePing();
    // `@<origin> <topics>`: an origin of ours means our own NOTIFY coming back, and `poke` woke this
    // process's consumers before it was sent. Waking them again would only cost each an extra read.
    let body = payload;
    if (payload.startsWith('@')) {
      const space = payload.indexOf(' ');
      if (payload.slice(1, space) === this.#origin) return;
      body = payload.slice(space + 1);
    }
    if (fromSelf) return;
    if (body === '*') {
      this.#wakeLocal('all');
      return;
    }
    const topics = new Set<string>();
    for (const token of body.split(',')) {
      if (token.startsWith('!')) this.#signal(token.slice(1));
      else topics.add(token);
    }
    if (topics.size > 0) this.#wakeLocal(topics);
  }

  #onEnd(error: Error | undefined): void {
    if (this.#closed) return;
    this.#session = undefined;
    this.listening = false;
    clearTimeout(this.#pingTimer);
    this.#scheduleReconnect(error);
  }

  #schedulePing(): void {
    clearTimeout(this.#pingTimer);
    if (this.#closed || this.#driver.embedded) return;
    this.#pingTimer = setTimeout(() => {
      const session = this.#session;
      if (session === undefined) return;
      session.ping().then(
        () => this.#schedulePing(),
        (error: unknown) => {
          void session.close();
          this.#onEnd(error as Error);
        },
      );
    }, this.#options.pingMs);
    this.#pingTimer.unref();
  }

  #scheduleReconnect(error: unknown): void {
    if (this.#closed || this.#reconnectTimer !== undefined) return;
    const { reconnectMinMs, reconnectMaxMs } = this.#options;
    const delay = Math.min(reconnectMaxMs, reconnectMinMs * 2 ** this.#attempt) * (0.75 + Math.random() * 0.5);
    if (this.#attempt === 0) {
      this.#options.warn(`Notifier lost its connection to ${this.#driver.description}; reconnecting`, error);
      this.#options.connection?.(true, error);
    }
    this.#attempt++;
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = undefined;
      this.#connecting ??= this.#connect();
    }, delay);
    this.#reconnectTimer.unref();
  }
}
