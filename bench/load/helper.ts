/**
 * A second process for a workload that needs one besides the measuring child: the request/reply rows'
 * repliers (Tidings' handler, the HTTP server, the NATS responder). It is the same system file forked with
 * `--helper`; `runChild` then calls the system's `helper`, which opens its side and resolves when ready.
 * It ends when the measuring child does (the IPC channel closes).
 */
import { fork } from 'node:child_process';
import type { Task } from '../protocol.ts';

export const HELPER_FLAG = '--helper';

export interface Helper {
  pid: number;
  stop(): Promise<void>;
}

export function startHelper(task: Task): Promise<Helper> {
  const child = fork(process.argv[1]!, [JSON.stringify(task), HELPER_FLAG], { execArgv: process.execArgv, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('message', () =>
      resolve({
        pid: child.pid ?? 0,
        stop: async () => {
          const exited = new Promise((done) => child.once('exit', done));
          child.disconnect();
          await exited;
        },
      }),
    );
    child.once('exit', (code) => reject(new Error(`the helper process exited with ${code} before it was ready`)));
  });
}

/** In the helper process: runs `open`, says it is ready, and exits when the measuring child goes away. */
export async function serveHelper(open: () => Promise<() => Promise<void>>): Promise<void> {
  const close = await open();
  process.on('disconnect', () => {
    void close().finally(() => process.exit(0));
  });
  process.send?.('ready');
}
