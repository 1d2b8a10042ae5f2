/** The defaults of the operator functions (dead letters, tail). */
export const adminDefaults = {
  /** Dead letters moved per transaction by a redrive or a drop. */
  chunkSize: 500,
  /** Dead letters read to group them, where the store cannot group by itself (a broker's queue). */
  groupScanLimit: 10_000,
  /** Rows `listDeadLetters` returns. */
  listLimit: 100,
  /** How often `tailTopic` looks for new messages. */
  tailPollMs: 200,
  /** Messages `tailTopic` reads per query. */
  tailBatch: 500,
} as const;
