import type { SagaRow, SagaStore } from '../core/saga.ts';
import { rollbackHook, type MemoryTransaction } from './transaction.ts';

/**
 * Saga instances kept in memory. Loading one locks it until the loading transaction ends, as PostgreSQL's
 * row lock does, so two transitions of one instance never interleave; a save applies at commit.
 */
export function memorySagaStore(): SagaStore<MemoryTransaction> {
  /** Saga instances by [saga, id], and the instances locked by a transaction in progress. */
  const instances = new Map<string, SagaRow>();
  const locks = new Map<string, Promise<void>>();
  return {
    async load(tx, saga, id) {
      const name = JSON.stringify([saga, id]);
      while (locks.has(name)) await locks.get(name);
      let release!: () => void;
      locks.set(name, new Promise<void>((resolve) => (release = resolve)));
      const unlock = () => {
        locks.delete(name);
        release();
      };
      tx.onCommit(unlock);
      rollbackHook(tx, unlock);
      return instances.get(name);
    },
    async find(saga, id) {
      return instances.get(JSON.stringify([saga, id]));
    },
    async save(tx, saga, id, row) {
      const name = JSON.stringify([saga, id]);
      if ((instances.get(name)?.version ?? 0) !== row.version - 1) return false;
      const copy = { ...row, state: JSON.parse(JSON.stringify(row.state)) as unknown };
      tx.onCommit(() => instances.set(name, copy));
      return true;
    },
  };
}
