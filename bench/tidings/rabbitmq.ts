/** Tidings on RabbitMQ (workloads 2, 3, 5; bench/tidings/on-broker.ts), in a queue and exchange prefix of its own per task. */
import { deleteRabbit, PARTITIONS, RABBITMQ_PROCESSES, RABBITMQ_URL, rabbitReady, uniqueId } from '../load/brokers.ts';
import { runChild } from '../load/child.ts';
import { ASK, Ev, tidingsOnBroker } from './on-broker.ts';
import { tidings } from './build.ts';

const { rabbitmq, Names } = await tidings<typeof import('../../src/rabbitmq/index.ts')>('rabbitmq/index');

// The request row's replier is this file forked (load/helper.ts): it inherits the id through the environment.
process.env.TBENCH_BROKER_ID ??= uniqueId();
const prefix = `tbench.${process.env.TBENCH_BROKER_ID}.`;
const names = new Names(prefix);
const partitionQueues = (subscriptions: readonly string[]) => subscriptions.flatMap((s) => Array.from({ length: PARTITIONS }, (_, p) => names.partition(s, p)));

runChild(
  tidingsOnBroker({
    processes: RABBITMQ_PROCESSES,
    declareBeforeBacklog: true,
    backbone: (outbox) =>
      rabbitmq({
        url: RABBITMQ_URL,
        prefix,
        connectionName: 'tidings-bench',
        ...(outbox === undefined ? {} : { outbox }),
        onWarning: (message) => process.stderr.write(`[tidings] ${message}\n`),
      }),
    // Closed channels hand their unacknowledged messages back: a stopped bus leaves only unacked ones ready.
    unacked: (subscriptions) => rabbitReady(partitionQueues(subscriptions)),
    cleanup: (subscriptions) =>
      deleteRabbit(
        [
          ...partitionQueues(subscriptions),
          ...subscriptions.map((s) => names.deadQueue(s)),
          names.registry,
          // The request row's command owner (rabbitmq/owners.ts).
          `${prefix}${ASK}:owner`,
          `${prefix}${ASK}:owner-lock`,
        ],
        [names.exchange(Ev.name), names.exchange(ASK), ...subscriptions.flatMap((s) => [names.returnExchange(s), names.workers(s)])],
      ),
  }),
);
