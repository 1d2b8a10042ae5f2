/** The conformance suite on the in-memory backbone: one backbone object is the whole world of a test. */
import { memory, type MemoryTransaction } from '../src/memory/index.ts';
import { conformance, type EffectStore } from './conformance/suite.ts';

conformance<MemoryTransaction>({
  name: 'memory',
  offers: { transactions: true, durable: true, balances: true, commandOwners: true },
  async namespace() {
    const backbone = memory({ onWarning: () => undefined });
    const rows: Array<{ messageId: string; key: string; seq: number }> = [];
    const effects: EffectStore<MemoryTransaction> = {
      // An effect of the handler's transaction: it happens only if the transaction commits.
      write: async (tx, message) => tx.onCommit(() => rows.push({ messageId: message.id, key: message.data.key, seq: message.data.seq })),
      rows: async () => [...rows],
    };
    return { backbone: () => backbone, effects, cleanup: async () => undefined };
  },
});
