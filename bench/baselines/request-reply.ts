/**
 * The request/reply rows' baselines (issue 21), beside Tidings' `bus.request` on PostgreSQL: a plain HTTP
 * call on loopback (`node:http`, a keep-alive agent, a JSON body each way) and NATS core request/reply (no
 * JetStream: nothing stored). The replier runs in a helper process, like Tidings' (load/helper.ts).
 */
import http from 'node:http';
import { connect, JSONCodec } from 'nats';
import { runChild } from '../load/child.ts';
import { type BenchEvent, makeEvent } from '../load/events.ts';
import { type Helper, startHelper } from '../load/helper.ts';
import { NATS_PROCESSES, NATS_URL, uniqueId } from '../load/brokers.ts';
import { roundTrips } from '../load/round-trip.ts';
import type { ChildResult, Task } from '../protocol.ts';

const codec = JSONCodec<BenchEvent | { seq: number }>();
/**
 * Where the helper answers, named after the asking process (the helper's parent) so that they agree and two
 * runs never meet: a NATS subject, a loopback port.
 */
const subjectOf = (askerPid: number) => `tbench.rr.${askerPid}`;
const portOf = (askerPid: number) => 47_000 + (askerPid % 1_000);

async function serveHttp(): Promise<() => Promise<void>> {
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (chunk: Buffer) => {
      body += chunk.toString();
    });
    req.on('end', () => {
      const { seq } = JSON.parse(body) as BenchEvent;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ seq }));
    });
  });
  await new Promise<void>((resolve) => server.listen(portOf(process.ppid), '127.0.0.1', resolve));
  return () => new Promise((resolve) => server.close(() => resolve()));
}

async function serveNats(): Promise<() => Promise<void>> {
  const nc = await connect({ servers: NATS_URL });
  nc.subscribe(subjectOf(process.ppid), {
    callback: (_error, message) => message.respond(codec.encode({ seq: (codec.decode(message.data) as BenchEvent).seq })),
  });
  await nc.flush();
  return () => nc.close();
}

async function request(task: Task): Promise<ChildResult> {
  let helper: Helper | undefined;
  try {
    helper = await startHelper(task);
    if (task.system === 'http') {
      const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
      const port = portOf(process.pid);
      const call = (seq: number) =>
        new Promise<void>((resolve, reject) => {
          const req = http.request({ host: '127.0.0.1', port, path: '/ask', method: 'POST', agent, headers: { 'content-type': 'application/json' } }, (res) => {
            res.resume();
            res.on('end', () => resolve());
          });
          req.on('error', reject);
          req.end(JSON.stringify(makeEvent(seq, task.variant.keys)));
        });
      const result = await roundTrips(task, [], helper.pid, call);
      agent.destroy();
      return result;
    }
    const nc = await connect({ servers: NATS_URL, name: `tbench-${uniqueId()}` });
    try {
      return await roundTrips(task, NATS_PROCESSES, helper.pid, (seq) =>
        nc.request(subjectOf(process.pid), codec.encode(makeEvent(seq, task.variant.keys)), { timeout: 30_000 }),
      );
    } finally {
      await nc.close();
    }
  } finally {
    await helper?.stop();
  }
}

runChild({ request, helper: (task) => (task.system === 'http' ? serveHttp() : serveNats()) });
