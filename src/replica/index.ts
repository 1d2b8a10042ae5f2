/**
 * Replicas: a service's own copy of data another service owns, fed by its events, with staleness,
 * rebuild by state transfer, and drift detection and repair against the source over the bus.
 * See docs/replicas.md.
 */
export { defineReplica, feed, replicaDefaults } from './define.ts';
export type { Feed, ReplicaDefinition, ReplicaOptions, ReplicaStats, Staleness, DriftReport, RebuildProgress, RebuildReport } from './define.ts';
export { replica, SchemaReplica, type Replica, type ReadScope } from './replica.ts';
export { StampReplicas } from './stamps.ts';
export { defineSource, source, sourceDefaults } from './source.ts';
export type { SourceDefinition, SourceOptions, SourceStats, ReplicaSource } from './source.ts';
export { digestTree } from './digest.ts';
export { requestContract, replyContract, checkContract, rebuildContract } from './protocol.ts';
export type { ReplicaRequest, ReplicaReply, StateRow, CheckCommand, RebuildCommand } from './protocol.ts';
export { listReplicas, requestDriftCheck, requestRebuild, type ReplicaStatus } from './admin.ts';
