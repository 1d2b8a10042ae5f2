/**
 * `tidings contracts check --module file [--against file|registry]`: the breaking changes between the
 * code's contracts and what is deployed (a committed AsyncAPI document, or the registry the running services
 * wrote), naming contract, field and affected consumers. Exits 1 on any breaking change: a step before deploy.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { TidingsError } from 'tidings';
import {
  asyncapiDocument,
  compatibility,
  contractsOfCode,
  contractsOfDocument,
  renderFindings,
  type AsyncApiDocument,
  type ContractSet,
} from 'tidings/asyncapi';
import { CommandFailed, emit, settingsOf, type CliContext } from '../context.ts';
import { loadModule } from '../module.ts';
import { serviceRecords } from '../services.ts';

export function registerContracts(program: Command, context: CliContext): void {
  const contracts = program.command('contracts').description('check contract changes against what is deployed');
  contracts
    .command('check')
    .description('breaking changes between the code and a committed AsyncAPI document or the registry; exit 1 on any')
    .requiredOption('--module <file>', 'the code: a module that exports the contracts (defineEvent, defineCommand) and/or the buses')
    .option('--against <source>', 'an AsyncAPI document (a file written by tidings asyncapi) or "registry" (the database\'s)', 'registry')
    .option('--stream <name>', 'with a nats:// URL: the JetStream stream of a NATS bus without an outbox, as given to nats({ stream })')
    .option('--strict-versions', 'any schema change within a version breaks, even adding an optional field')
    .action(async (options: { module: string; against: string; strictVersions?: boolean }, command: Command) => {
      const warn = (message: string) => context.err(`warning: ${message}\n`);
      const code = await loadModule(options.module, context.cwd ?? process.cwd(), warn);
      const deployed = options.against === 'registry' ? await registrySet(context, command, warn) : contractsOfDocument(readDocument(context, options.against));
      const findings = compatibility(deployed, contractsOfCode(code.contracts, code.services), { strictVersions: options.strictVersions === true });
      const breaking = findings.filter((finding) => finding.breaking);
      const against = options.against === 'registry' ? 'the registry' : options.against;
      emit(context, settingsOf(context, command), { against, findings }, () =>
        findings.length === 0 ? `The contracts of ${options.module} are compatible with ${against}: no changes.` : renderFindings(findings),
      );
      if (breaking.length > 0) {
        throw new CommandFailed(
          `${breaking.length} breaking change${breaking.length === 1 ? '' : 's'} against ${against}: give changed schemas a new version with an upcaster, and deploy consumers before producers (docs/contracts.md)`,
        );
      }
    });
}

async function registrySet(context: CliContext, command: Command, warn: (message: string) => void): Promise<ContractSet> {
  const services = await serviceRecords(context, command, undefined, warn);
  if (services.length === 0) throw new CommandFailed('The registry is empty: services record themselves when they start');
  return contractsOfDocument(asyncapiDocument(services, { onWarning: warn }));
}

function readDocument(context: CliContext, file: string): AsyncApiDocument {
  try {
    return JSON.parse(readFileSync(resolve(context.cwd ?? process.cwd(), file), 'utf8')) as AsyncApiDocument;
  } catch (error) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `--against ${file}: ${(error as Error).message}; give an AsyncAPI document written by tidings asyncapi, or "registry"`,
    );
  }
}
