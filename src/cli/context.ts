/**
 * What every command of the `tidings` program is given and shares: the context it runs in (streams,
 * environment, Ctrl-C), its global options, and how it shows a result (an aligned table for a person, JSON
 * with `--json` for a script). Failures become exit codes in main.ts; nothing here exits the process.
 */
import type { Command } from 'commander';
import { type GivenOptions, type GlobalOptions, oneStamp, resolveGlobals } from './config.ts';

/** What scripts can rely on. Also listed in `tidings --help`. */
export const exitCodes = {
  ok: 0,
  /** The operation ran and failed: an error from the database, nothing found, stopped half-way. */
  failed: 1,
  /** The command line was wrong: unknown command or option, bad value, missing selection. */
  usage: 2,
  /** The database could not be reached, refused the login, or does not exist. */
  unreachable: 3,
} as const;

/** A command ran and did not succeed (nothing matched, interrupted): exit code 1, with what to do next. */
export class CommandFailed extends Error {
  override name = 'CommandFailed';
}

export interface CliContext {
  readonly env: NodeJS.ProcessEnv;
  /** Where the config file is looked for (see config.ts); the process's folder when absent. */
  readonly cwd?: string;
  /** Aborted by Ctrl-C: long operations stop between steps and say how far they got. */
  readonly interrupt: AbortSignal;
  readonly stdoutIsTTY: boolean;
  /** The terminal's width, when stdout is one: tables are cut to fit. */
  readonly columns?: number | undefined;
  readonly out: (text: string) => void;
  readonly err: (text: string) => void;
}

/** Each command's file adds it to the program (program.ts lists them). */
export type Register = (program: Command, context: CliContext) => void;

/**
 * The global options of `command`, completed from the environment, the config file and the defaults
 * (config.ts), for one place: with stamps configured, the one --stamp names (refused without it).
 */
export function globalsOf(context: CliContext, command: Command): GlobalOptions {
  return oneStamp(settingsOf(context, command), commandPath(command));
}

/** The global options as given, stamps and all: for commands that choose their stamps themselves (stamps.ts) or need none. */
export function settingsOf(context: CliContext, command: Command): GlobalOptions {
  return resolveGlobals(command.optsWithGlobals<GivenOptions>(), context.env, context.cwd ?? process.cwd());
}

/** `dead-letters redrive`: the command's name under `tidings`, for messages. */
function commandPath(command: Command): string {
  const names: string[] = [];
  for (let current: Command | null = command; current?.parent != null; current = current.parent) names.unshift(current.name());
  return names.join(' ');
}

/** `value` as JSON with --json, else `human()`'s text (nothing when it is empty). */
export function emit(context: CliContext, globals: GlobalOptions, value: unknown, human: () => string): void {
  if (globals.json) context.out(`${JSON.stringify(value, null, 2)}\n`);
  else {
    const text = human();
    if (text !== '') context.out(`${text}\n`);
  }
}

/** Progress bars are for a person: on a terminal, and not in JSON. */
export function showProgress(context: CliContext, globals: GlobalOptions): boolean {
  return context.stdoutIsTTY && !globals.json;
}

/** Waits `ms`, or less when Ctrl-C comes: for commands that watch or wait (never rejects). */
export function pause(context: CliContext, ms: number): Promise<void> {
  const signal = context.interrupt;
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    }
  });
}
