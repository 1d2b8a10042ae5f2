/**
 * A FIFO queue over an array with a moving head: push and shift are O(1) amortised (Array.prototype.shift
 * is O(n), which makes a queue of 100k messages quadratic). The consumed prefix is cut off once it is
 * both large and more than half of the array.
 */
export class Deque<T> {
  #items: (T | undefined)[] = [];
  #head = 0;

  get length(): number {
    return this.#items.length - this.#head;
  }

  push(item: T): void {
    this.#items.push(item);
  }

  shift(): T | undefined {
    if (this.#head >= this.#items.length) return undefined;
    const item = this.#items[this.#head];
    this.#items[this.#head] = undefined;
    this.#head++;
    if (this.#head === this.#items.length) {
      // Most keys hold one message at a time: reuse the array rather than make garbage per message.
      this.#items.length = 0;
      this.#head = 0;
    } else if (this.#head > 1_024 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }

  /** Puts items back in front, keeping their order: a retried head, redriven messages. */
  unshift(...items: T[]): void {
    if (items.length <= this.#head) {
      this.#head -= items.length;
      for (let i = 0; i < items.length; i++) this.#items[this.#head + i] = items[i];
      return;
    }
    this.#items = [...items, ...this.#items.slice(this.#head)];
    this.#head = 0;
  }

  peek(): T | undefined {
    return this.#head < this.#items.length ? this.#items[this.#head] : undefined;
  }

  *[Symbol.iterator](): IterableIterator<T> {
    for (let i = this.#head; i < this.#items.length; i++) yield this.#items[i] as T;
  }
}
