/**
 * The code's side of `tidings asyncapi --module` and `tidings contracts check`: a module of the application
 * that exports its buses (created, not started) and, or, its contracts. Exports are recognised by shape, not
 * by class, so a module that imports another copy of Tidings (the built package beside the CLI's sources)
 * is read alike.
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { type AnyContract, TidingsError } from 'tidings';
import { describeContract, describeService, type ContractRecord, type ServiceRecord } from 'tidings/asyncapi';

/** What describeService reads of a bus. */
type CatalogSource = Parameters<typeof describeService>[0];

interface ModuleContents {
  /** One record per exported bus. */
  readonly services: ServiceRecord[];
  /** Every contract exported, or used by an exported bus, by type. */
  readonly contracts: ContractRecord[];
}

/** Imports `file` (relative to `cwd`) and describes what it exports. A TypeScript module needs a loader (tsx) or Node's type stripping. */
export async function loadModule(file: string, cwd: string, warn: (message: string) => void): Promise<ModuleContents> {
  let exported: Record<string, unknown>;
  try {
    exported = (await import(pathToFileURL(resolve(cwd, file)).href)) as Record<string, unknown>;
  } catch (cause) {
    throw new TidingsError('INVALID_OPTIONS', `--module ${file} could not be imported: ${(cause as Error).message}`, { cause });
  }
  const values = Object.values(exported).flatMap((value) => (Array.isArray(value) ? value : isPlainRecord(value) ? Object.values(value) : [value]));
  const buses = values.filter(isBus);
  const services = buses.map((bus) => describeService(bus, warn));
  const contracts = new Map<string, ContractRecord>();
  for (const contract of values.filter(isContract)) contracts.set(contract.type, describeContract(contract));
  for (const service of services) {
    for (const contract of [...service.publishes, ...service.subscriptions.flatMap((subscription) => subscription.contracts)]) {
      if (!contracts.has(contract.type)) contracts.set(contract.type, contract);
    }
  }
  if (services.length === 0 && contracts.size === 0) {
    throw new TidingsError(
      'INVALID_OPTIONS',
      `--module ${file} exports no bus and no contract: export the buses your services create (createBus, not started) or the contracts (defineEvent, defineCommand)`,
    );
  }
  return { services, contracts: [...contracts.values()].sort((a, b) => a.type.localeCompare(b.type)) };
}

function isBus(value: unknown): value is CatalogSource {
  const bus = value as Partial<CatalogSource> | null;
  return bus !== null && typeof bus === 'object' && typeof bus.service === 'string' && bus.subscriptions instanceof Map && Array.isArray(bus.publishes);
}

function isContract(value: unknown): value is AnyContract {
  const contract = value as Partial<AnyContract> | null;
  return (
    contract !== null &&
    typeof contract === 'object' &&
    (contract.kind === 'event' || contract.kind === 'command') &&
    typeof contract.type === 'string' &&
    typeof contract.schema?.['~standard']?.validate === 'function'
  );
}

/** An object literal of exports (`export const buses = { orders, billing }`), not a bus or a contract. */
function isPlainRecord(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype && !isContract(value);
}
