/**
 * `tidings/asyncapi`: contracts as documentation, and the checks of their evolution. AsyncAPI 3.0 documents
 * from service records (a bus's `bus.asyncapi()`, or the registry's for the whole system), the differences
 * between two documents (`tidings asyncapi --check`), and breaking changes between deployed contracts and
 * the code (`tidings contracts check`). docs/contracts.md describes them.
 */
export { asyncapiDocument, ASYNCAPI_VERSION, type AsyncApiDocument, type AsyncApiOptions, type Channel, type Message, type Operation } from './document.ts';
export { differences, renderDifferences, type Difference } from './diff.ts';
export {
  compatibility,
  contractsOfCode,
  contractsOfDocument,
  renderFindings,
  schemaChanges,
  type CompatibilityOptions,
  type ContractSet,
  type Finding,
} from './compatibility.ts';
export {
  describeContract,
  describeService,
  type BackboneDescription,
  type ContractRecord,
  type ContractRegistry,
  type JsonSchema,
  type RecordedService,
  type ServiceRecord,
  type SubscriptionRecord,
} from '../core/catalog.ts';
