/**
 * How the CLI shows things to a person: aligned tables, short durations, a progress bar. Scripts use
 * `--json` instead, which bypasses all of this.
 */
import cliProgress from 'cli-progress';

export interface Column<T> {
  readonly header: string;
  readonly value: (row: T) => string | number | null | undefined;
  /** Numbers align right unless told otherwise. */
  readonly align?: 'left' | 'right';
  /** Longer cells are cut with an ellipsis. */
  readonly max?: number;
  /** May be cut (down to its header's width, 8 at least) when the table is wider than the terminal; 2 gives way before 1. */
  readonly shrink?: 1 | 2;
  /** How a cell reads at a glance, coloured on a terminal: trouble, worth a look, or fine. */
  readonly tone?: (row: T) => Tone | undefined;
}

export type Tone = 'bad' | 'warn' | 'good' | 'dim';

interface TableOptions {
  readonly indent?: string;
  /** The terminal's width: shrinkable columns give way until the table fits. */
  readonly width?: number | undefined;
  readonly style?: Style;
}

/** An aligned plain-text table, headers in capitals, `-` for empty cells. */
export function table<T>(rows: readonly T[], columns: readonly Column<T>[], options: TableOptions = {}): string {
  const { indent = '', width, style = plain } = options;
  const cells = rows.map((row) =>
    columns.map((column) => {
      const value = column.value(row);
      const text = value === null || value === undefined || value === '' ? '-' : oneLine(String(value));
      return column.max !== undefined && text.length > column.max ? `${text.slice(0, column.max - 1)}…` : text;
    }),
  );
  const rightAligned = columns.map(
    (column) => column.align === 'right' || (column.align === undefined && rows.length > 0 && rows.every((row) => typeof column.value(row) === 'number')),
  );
  const widths = columns.map((column, index) => Math.max(column.header.length, ...cells.map((line) => line[index]!.length)));
  if (width !== undefined) fit(widths, columns, width - indent.length);
  const cut = (text: string, index: number) => (text.length > widths[index]! ? `${text.slice(0, widths[index]! - 1)}…` : text);
  const render = (line: readonly string[], row: T | undefined) =>
    indent +
    line
      .map((cell, index) => {
        const text = cut(cell, index);
        const padded = rightAligned[index] ? text.padStart(widths[index]!) : text.padEnd(widths[index]!);
        const tone = row === undefined ? undefined : columns[index]!.tone?.(row);
        return tone === undefined ? padded : style.paint(tone, padded);
      })
      .join('  ')
      .trimEnd();
  return [
    style.bold(
      render(
        columns.map((column) => column.header.toUpperCase()),
        undefined,
      ),
    ),
    ...cells.map((line, index) => render(line, rows[index])),
  ].join('\n');
}

/** Narrows the shrinkable columns, those that give way first before the others, until the table fits `available`. */
function fit<T>(widths: number[], columns: readonly Column<T>[], available: number): void {
  const floor = (index: number) => Math.max(8, columns[index]!.header.length);
  for (const order of [2, 1] as const) {
    for (const [index, column] of columns.entries()) {
      if (column.shrink !== order) continue;
      const over = widths.reduce((sum, w) => sum + w, 0) + 2 * (widths.length - 1) - available;
      if (over <= 0) return;
      widths[index] = Math.max(floor(index), widths[index]! - over);
    }
  }
}

/** Colours for a person at a terminal; `plain` for everything else (pipes, files, --json, NO_COLOR). */
export interface Style {
  paint(tone: Tone, text: string): string;
  bold(text: string): string;
}

export const plain: Style = { paint: (_tone, text) => text, bold: (text) => text };

const ANSI: Record<Tone, string> = { bad: '31', warn: '33', good: '32', dim: '2' };

export const coloured: Style = {
  paint: (tone, text) => `\x1b[${ANSI[tone]}m${text}\x1b[0m`,
  bold: (text) => `\x1b[1m${text}\x1b[0m`,
};

/** Colour on a terminal unless NO_COLOR is set (https://no-color.org); FORCE_COLOR asks for it anywhere. */
export function styleFor(isTTY: boolean, env: NodeJS.ProcessEnv): Style {
  if (env.NO_COLOR !== undefined && env.NO_COLOR !== '') return plain;
  if (env.FORCE_COLOR !== undefined && env.FORCE_COLOR !== '0') return coloured;
  return isTTY ? coloured : plain;
}

/** `350 ms`, `4.2 s`, `3 min 5 s`, `2 h 3 min`, `3 d 4 h`. */
export function duration(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return '-';
  const abs = Math.abs(ms);
  if (abs < 1_000) return `${Math.round(abs)} ms`;
  if (abs < 60_000) return `${(abs / 1_000).toFixed(1)} s`;
  const seconds = Math.floor(abs / 1_000);
  if (seconds < 3_600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  if (seconds < 86_400) return `${Math.floor(seconds / 3_600)} h ${Math.floor((seconds % 3_600) / 60)} min`;
  return `${Math.floor(seconds / 86_400)} d ${Math.floor((seconds % 86_400) / 3_600)} h`;
}

/** A lease as an operator reads it: who has it and for how long. */
export function lease(owner: string | null, remainingMs: number | null): string {
  if (owner === null) return 'free';
  if (remainingMs === null) return 'held';
  return remainingMs >= 0 ? `${duration(remainingMs)} left` : `expired ${duration(remainingMs)} ago`;
}

/** `2026-01-31 12:00:05Z`: an ISO time without the milliseconds, readable in a table. */
export function shortTime(value: string): string {
  const time = new Date(value);
  return Number.isNaN(time.getTime())
    ? value
    : time
        .toISOString()
        .replace('T', ' ')
        .replace(/\.\d+Z$/, 'Z');
}

/** `a, b, c` or, past `max`, `a, b, c and 7 more`. */
export function listed(items: readonly string[], max: number): string {
  return items.length <= max ? items.join(', ') : `${items.slice(0, max).join(', ')} and ${items.length - max} more`;
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ⏎ ');
}

interface Progress {
  update(done: number, total: number): void;
  stop(): void;
}

/**
 * Runs `run` with a progress bar on stderr, stopped however `run` ends. The bar is shown only to a person
 * (`enabled`: stdout is a terminal and the output is not JSON); otherwise it does nothing, so callers need
 * no branches.
 */
export async function withProgress<T>(
  options: { readonly label: string; readonly enabled: boolean },
  run: (bar: Pick<Progress, 'update'>) => Promise<T>,
): Promise<T> {
  const bar = progress(options);
  try {
    return await run(bar);
  } finally {
    bar.stop();
  }
}

function progress(options: { readonly label: string; readonly enabled: boolean }): Progress {
  if (!options.enabled) return { update: () => undefined, stop: () => undefined };
  const bar = new cliProgress.SingleBar(
    {
      format: `${options.label} [{bar}] {value}/{total} ({percentage} %) {eta_formatted} left`,
      clearOnComplete: true,
      hideCursor: true,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(done, total) {
      if (!started) {
        bar.start(total, done);
        started = true;
      } else {
        bar.setTotal(total);
        bar.update(done);
      }
    },
    stop() {
      if (started) bar.stop();
      started = false;
    },
  };
}
