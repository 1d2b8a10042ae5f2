/**
 * One tenant's stamp: its backbone, whether it opened, and the consumers that run on it. A stamp that cannot
 * open stays down alone: its tenant's publishes fail with the reason, the other stamps carry on.
 */
import type { Backbone } from '../core/backbone.ts';

export class Stamp<Tx> {
  readonly tenant: string;
  readonly backbone: Backbone<Tx>;
  /** Called once the backbone has opened, to start the running subscriptions on it. */
  readonly #opened: (stamp: Stamp<Tx>) => Promise<void>;
  #opening: Promise<void> | undefined;
  #up = false;
  /** Why it last failed to open, while it is down. */
  #failure: unknown;

  constructor(tenant: string, backbone: Backbone<Tx>, opened: (stamp: Stamp<Tx>) => Promise<void>) {
    this.tenant = tenant;
    this.backbone = backbone;
    this.#opened = opened;
  }

  /** True once its backbone has opened. */
  get up(): boolean {
    return this.#up;
  }

  /** Why it could not open, if it could not (undefined once up, or before trying). */
  get failure(): unknown {
    return this.#failure;
  }

  /** Its backbone was closed: the next open() opens it again. */
  closed(): void {
    this.#up = false;
    this.#opening = undefined;
  }

  /** Opens its backbone (once; again after a failure) and starts the running subscriptions on it. */
  open(): Promise<void> {
    this.#opening ??= this.backbone.open().then(
      async () => {
        this.#up = true;
        this.#failure = undefined;
        await this.#opened(this);
      },
      (error: unknown) => {
        this.#opening = undefined;
        this.#failure = error;
        throw error;
      },
    );
    return this.#opening;
  }
}
