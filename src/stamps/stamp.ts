/**
 * One tenant's stamp: its backbone, whether it opened, and the consumers that run on it. A stamp that cannot
 * open stays down alone: its tenant's publishes fail with the reason, the other stamps carry on.
 */
import type { Backbone } from '../core/backbone.ts';

export class Stamp<Tx> {
  readonly tenant: string;
  /** Makes the stamp's backbone: again after a failed open, since a backbone may keep its failure (PostgreSQL's does). */
  readonly #make: () => Backbone<Tx>;
  #backbone: Backbone<Tx>;
  /** Called once the backbone has opened, to start the running subscriptions on it. */
  readonly #opened: (stamp: Stamp<Tx>) => Promise<void>;
  #opening: Promise<void> | undefined;
  /** Its backbone is open (its subscriptions may be starting). */
  #open = false;
  /** Open, with the running subscriptions started on it: what publishing to it waits for. */
  #up = false;
  /** Why it last failed to open, and when (epoch ms), while it is down. */
  #failure: unknown;
  #failedAt: number | undefined;

  constructor(tenant: string, make: () => Backbone<Tx>, opened: (stamp: Stamp<Tx>) => Promise<void>) {
    this.tenant = tenant;
    this.#make = make;
    this.#backbone = make();
    this.#opened = opened;
  }

  get backbone(): Backbone<Tx> {
    return this.#backbone;
  }

  /**
   * True once its backbone has opened and the running subscriptions have started on it, so that a message
   * published to it is never older than a subscription that starts from 'now'.
   */
  get up(): boolean {
    return this.#up;
  }

  /** True once its backbone has opened: a subscription declared from now on starts on it. */
  get opened(): boolean {
    return this.#open;
  }

  /** Why it could not open, if it could not (undefined once up, or before trying). */
  get failure(): unknown {
    return this.#failure;
  }

  /** When it last failed to open (epoch ms), while it is down. */
  get failedAt(): number | undefined {
    return this.#failedAt;
  }

  /** Its backbone was closed: the next open() opens it again. */
  closed(): void {
    this.#open = false;
    this.#up = false;
    this.#opening = undefined;
  }

  /** Opens its backbone (once; again after a failure) and starts the running subscriptions on it. */
  open(): Promise<void> {
    this.#opening ??= this.backbone.open().then(
      async () => {
        this.#open = true;
        this.#failure = undefined;
        this.#failedAt = undefined;
        await this.#opened(this);
        this.#up = true;
      },
      (error: unknown) => {
        this.#opening = undefined;
        this.#failure = error;
        this.#failedAt = Date.now();
        // What the failed backbone opened is closed; the next try starts from a new one.
        const failed = this.#backbone;
        failed.close().catch(() => undefined);
        this.#backbone = this.#make();
        throw error;
      },
    );
    return this.#opening;
  }
}
