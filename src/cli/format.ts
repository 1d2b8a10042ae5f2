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
}

/** An aligned plain-text table, headers in capitals, `-` for empty cells. */
export function table<T>(rows: readonly T[], columns: readonly Column<T>[], indent = ''): string {
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
  const render = (line: readonly string[]) =>
    indent +
    line
      .map((cell, index) => (rightAligned[index] ? cell.padStart(widths[index]!) : cell.padEnd(widths[index]!)))
      .join('  ')
      .trimEnd();
  return [render(columns.map((column) => column.header.toUpperCase())), ...cells.map(render)].join('\n');
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

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ⏎ ');
}

export interface Progress {
  update(done: number, total: number): void;
  stop(): void;
}

/**
 * A progress bar on stderr, shown only to a person: when stdout is a terminal and the output is not JSON.
 * Otherwise it does nothing, so callers need no branches.
 */
export function progress(options: { readonly label: string; readonly enabled: boolean }): Progress {
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
