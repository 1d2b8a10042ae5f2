/**
 * The `tidings` command's entry: runs the command line and turns the outcome into an exit code
 * (0 ok, 1 the operation failed, 2 usage error, 3 database unreachable; see exitCodes). It only sets
 * process.exitCode, so pending output is flushed before the process ends.
 */
import { CommanderError } from 'commander';
import { TidingsError } from 'tidings';
import { CommandFailed, exitCodes } from './context.ts';
import { buildProgram } from './program.ts';

async function main(argv: readonly string[]): Promise<number> {
  const interrupt = new AbortController();
  // The first Ctrl-C stops long operations between steps, so they can say how far they got; the
  // listener goes with it, so a second Ctrl-C ends the process at once.
  process.once('SIGINT', () => interrupt.abort());
  // `tidings tail ... | head` closes our stdout: stop quietly instead of crashing on EPIPE.
  process.stdout.on('error', (error: NodeJS.ErrnoException) => {
    if (error.code === 'EPIPE') interrupt.abort();
  });
  const json = argv.includes('--json');
  const program = buildProgram({
    env: process.env,
    cwd: process.cwd(),
    interrupt: interrupt.signal,
    stdoutIsTTY: process.stdout.isTTY === true,
    columns: process.stdout.isTTY === true ? process.stdout.columns : undefined,
    out: (text) => void process.stdout.write(text),
    err: (text) => void process.stderr.write(text),
  });
  try {
    await program.parseAsync([...argv]);
    return exitCodes.ok;
  } catch (error) {
    const code = exitCodeOf(error);
    // Commander has printed its own usage errors and help already.
    if (!(error instanceof CommanderError)) report(error, code, json);
    return code;
  }
}

function exitCodeOf(error: unknown): number {
  if (error instanceof CommanderError) {
    return error.code === 'commander.helpDisplayed' || error.code === 'commander.version' ? exitCodes.ok : exitCodes.usage;
  }
  if (error instanceof TidingsError) {
    if (error.code === 'BACKBONE_UNAVAILABLE') return exitCodes.unreachable;
    if (error.code === 'INVALID_OPTIONS') return exitCodes.usage;
  }
  return exitCodes.failed;
}

function report(error: unknown, exitCode: number, json: boolean): void {
  const message = error instanceof Error ? error.message : String(error);
  const code = error instanceof TidingsError ? error.code : error instanceof CommandFailed ? 'FAILED' : ((error as { code?: unknown })?.code ?? 'FAILED');
  if (json) {
    process.stderr.write(`${JSON.stringify({ error: { code, message, exitCode } })}\n`);
    return;
  }
  // An unexpected error (not one of ours) keeps its stack when asked for: TIDINGS_DEBUG=1.
  const detail =
    !(error instanceof TidingsError || error instanceof CommandFailed) && process.env.TIDINGS_DEBUG && error instanceof Error ? `\n${error.stack}` : '';
  process.stderr.write(`tidings: ${message}${detail}\n`);
}

process.exitCode = await main(process.argv);
