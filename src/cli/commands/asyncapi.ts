/**
 * `tidings asyncapi [--module file] [--service s | --system] [--out file] [--check file]`: the AsyncAPI 3.0
 * document of one service or the whole system, from the registry the services write when they start (no
 * code needed), or from a module of the code that exports its buses. `--check` compares a committed document
 * and exits 1 with the differences: a CI step.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { TidingsError } from 'tidings';
import { asyncapiDocument, differences, renderDifferences, type AsyncApiDocument } from 'tidings/asyncapi';
import { CommandFailed, type CliContext } from '../context.ts';
import { serviceRecords } from '../services.ts';

interface DocumentOptions {
  module?: string;
  service?: string;
  system?: boolean;
  title?: string;
}

export function registerAsyncApi(program: Command, context: CliContext): void {
  program
    .command('asyncapi')
    .description("the AsyncAPI 3.0 document of a service or the whole system, from the registry (or --module's code); --check compares a committed one")
    .option('--module <file>', 'read the code instead of the registry: a module that exports the buses (created, not started) or contracts')
    .addHelpText(
      'after',
      "\nThe registry is read from --url: PostgreSQL (the bus's database, or a broker's outbox), or nats:// with --stream for a NATS bus without an outbox.",
    )
    .option('--service <name>', "only this service's operations")
    .option('--system', 'every service (the default)')
    .option('--title <text>', 'the document\'s info.title (default: the service, or "Tidings system")')
    .option('--stream <name>', 'with a nats:// URL: the JetStream stream of a NATS bus without an outbox, as given to nats({ stream })')
    .option('--out <file>', 'write the document there (JSON) instead of printing it')
    .option('--check <file>', 'compare this committed document with the code or registry: exit 1 and print the differences if they differ')
    .action(async (options: DocumentOptions & { out?: string; check?: string }, command: Command) => {
      const document = await buildDocument(context, command, options);
      const text = `${JSON.stringify(document, null, 2)}\n`;
      if (options.check !== undefined) {
        const committed = readDocument(context, options.check);
        const found = differences(committed, document);
        if (found.length > 0) {
          context.err(
            `${options.check} does not match ${sourceName(options)} (${found.length} difference${found.length === 1 ? '' : 's'}; - the file, + now):\n${renderDifferences(found)}\n`,
          );
          const rewrite = [
            'tidings asyncapi',
            ...(options.module === undefined ? [] : [`--module ${options.module}`]),
            ...selection(options),
            `--out ${options.check}`,
          ];
          throw new CommandFailed(`${options.check} is out of date: review the differences above, then update it with ${rewrite.join(' ')}`);
        }
        context.out(`${options.check} matches ${sourceName(options)}\n`);
      }
      if (options.out !== undefined) {
        writeFileSync(resolve(context.cwd ?? process.cwd(), options.out), text);
        if (options.check === undefined) context.err(`AsyncAPI document written to ${options.out}\n`);
      } else if (options.check === undefined) context.out(text);
    });
}

/** The document the options ask for; warnings (unconvertible schemas, versions with two schemas) go to stderr. */
async function buildDocument(context: CliContext, command: Command, options: DocumentOptions): Promise<AsyncApiDocument> {
  if (options.service !== undefined && options.system === true) throw new TidingsError('INVALID_OPTIONS', 'Give --service or --system, not both');
  const warn = (message: string) => context.err(`warning: ${message}\n`);
  const services = await serviceRecords(context, command, options.module, warn);
  const chosen = options.service === undefined ? services : services.filter((record) => record.service === options.service);
  if (chosen.length === 0) {
    const known = services.map((record) => record.service).join(', ');
    throw new CommandFailed(
      options.service === undefined
        ? `${sourceName(options)} has no service: a bus records itself when it starts (tidings migrate creates the table), or give --module`
        : `No service ${options.service} in ${sourceName({ ...options, service: undefined })}${known === '' ? '' : `; there: ${known}`}`,
    );
  }
  return asyncapiDocument(chosen, { ...(options.title === undefined ? {} : { title: options.title }), onWarning: warn });
}

function readDocument(context: CliContext, file: string): unknown {
  let text: string;
  try {
    text = readFileSync(resolve(context.cwd ?? process.cwd(), file), 'utf8');
  } catch (error) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `--check ${file}: ${(error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (error as Error).message}`,
    );
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new TidingsError('INVALID_OPTIONS', `--check ${file} is not JSON (${(error as Error).message}); tidings asyncapi writes JSON`);
  }
}

function sourceName(options: DocumentOptions): string {
  const what = options.service === undefined ? 'the system' : `service ${options.service}`;
  return `${what} in ${options.module ?? 'the registry'}`;
}

function selection(options: DocumentOptions): string[] {
  return [...(options.service === undefined ? [] : [`--service ${options.service}`]), ...(options.title === undefined ? [] : [`--title "${options.title}"`])];
}
