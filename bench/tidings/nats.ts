/** Tidings on NATS JetStream (workloads 2, 3, 5; bench/tidings/on-broker.ts), in a stream of its own per task. */
import { deleteNats, NATS_BUCKETS, NATS_PROCESSES, NATS_STREAM_MARK, NATS_URL, natsUnacked, uniqueId } from '../load/brokers.ts';
import { runChild } from '../load/child.ts';
import { tidingsOnBroker } from './on-broker.ts';
import { tidings } from './build.ts';

const { nats } = await tidings<typeof import('../../src/nats/index.ts')>('nats/index');

// The request row's replier is this file forked (load/helper.ts): it inherits the id through the environment.
process.env.TBENCH_BROKER_ID ??= uniqueId();
const id = process.env.TBENCH_BROKER_ID;
const stream = `${NATS_STREAM_MARK}${id}`;

runChild(
  tidingsOnBroker({
    processes: NATS_PROCESSES,
    declareBeforeBacklog: false,
    backbone: (outbox) =>
      nats({
        servers: NATS_URL,
        stream,
        subjectPrefix: `tbench_${id}`,
        buckets: NATS_BUCKETS,
        ...(outbox === undefined ? {} : { outbox }),
        onWarning: (message) => process.stderr.write(`[tidings] ${message}\n`),
      }),
    unacked: () => natsUnacked(stream),
    // The stream, its dead letters, and the KV buckets of leases, holds and command owners (streams KV_<stream>_leases, ...).
    cleanup: () => deleteNats([stream, `${stream}_DLQ`, `KV_${stream}_leases`, `KV_${stream}_holds`, `KV_${stream}_owners`]),
  }),
);
