/**
 * The parsers of option values: each turns the text of a command line into a typed value, or throws an
 * InvalidArgumentError that commander reports with the option's name (exit code 2).
 */
import { InvalidArgumentError } from 'commander';
import { checkIdentifier } from './internals.ts';

/** Where a replay or a tail begins: a log position, or the first message at or after a time. */
export type From = { kind: 'position'; position: number } | { kind: 'time'; time: string };

export function parseSchema(value: string): string {
  try {
    return checkIdentifier('--schema', value);
  } catch (error) {
    throw new InvalidArgumentError((error as Error).message);
  }
}

export function parseFrom(value: string): From {
  if (/^\d+$/.test(value)) {
    const position = Number(value);
    if (Number.isSafeInteger(position) && position >= 1) return { kind: 'position', position };
  } else if (/^\d{4}-\d{2}-\d{2}/.test(value) && !Number.isNaN(Date.parse(value))) {
    return { kind: 'time', time: new Date(value).toISOString() };
  }
  throw new InvalidArgumentError('expected a log position (a whole number from 1) or an ISO 8601 time such as 2026-01-31T12:00:00Z');
}

export function positiveInteger(value: string): number {
  const number = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(number) || number < 1) throw new InvalidArgumentError('expected a whole number from 1');
  return number;
}

export function positiveNumber(value: string): number {
  const number = Number(value);
  if (value.trim() === '' || !Number.isFinite(number) || number <= 0) throw new InvalidArgumentError('expected a number above 0');
  return number;
}
