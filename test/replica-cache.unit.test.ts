/**
 * A replica's rows in memory across a reload from its table (src/replica/cache.ts): memory runs ahead of the
 * table by the batch being acknowledged, so a reload whose read was taken before that batch committed must
 * not take memory back. CI saw it once: after a rebuild under live traffic a row read v4 from memory while
 * the table held v5 (replica.pg.test.ts, "a rebuild under live traffic").
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { RowCache } from '../src/replica/cache.ts';
import type { Entry } from '../src/replica/store.ts';

type Row = { name: string };
const entry = (version: number, name: string): Entry<Row> => ({ tenant: '', version, row: { name } });

test('a reload keeps what memory holds at a newer version than the table read, and takes the table otherwise', async () => {
  const cache = new RowCache<Row>('users', {});
  cache.remember('a', entry(4, 'a4'));
  cache.remember('b', entry(2, 'b2'));
  cache.remember('c', entry(7, 'c7'));
  // The batch applying a v5 was remembered, but had not committed when the table was read.
  cache.remember('a', entry(5, 'a5'));
  await cache.reload(async () => [
    ['a', entry(4, 'a4')],
    ['b', entry(3, 'b3')],
    ['c', entry(7, 'c7 as the source has it')],
  ]);
  assert.equal(cache.get('a', '')?.name, 'a5', 'not taken back to the table read before its commit');
  assert.equal(cache.get('b', '')?.name, 'b3', 'the table, newer');
  assert.equal(cache.get('c', '')?.name, 'c7 as the source has it', 'the table, at the same version');
});

test('rows remembered since a capture (a rebuild running) survive the reload, new keys included; a release ends the capture', async () => {
  const cache = new RowCache<Row>('users', {});
  cache.remember('a', entry(1, 'a1'));
  cache.capture();
  cache.remember('new', entry(1, 'inserted while the rebuild ran'));
  cache.remember('a', entry(2, 'a2'));
  await cache.reload(async () => [['a', entry(1, 'a1')]]);
  assert.equal(cache.get('new', '')?.name, 'inserted while the rebuild ran');
  assert.equal(cache.get('a', '')?.name, 'a2');
  assert.equal(cache.size, 2);

  cache.capture();
  cache.remember('later', entry(1, 'x'));
  cache.release();
  await cache.reload(async () => [['a', entry(2, 'a2')]]);
  assert.equal(cache.get('later', ''), undefined, 'a key the table lacks, remembered before the reload began and not captured, is gone');
  assert.equal(cache.size, 1);
});
