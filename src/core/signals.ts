/**
 * `bus.stopOnSignals()`: on SIGINT (Ctrl-C) or SIGTERM (docker stop, Kubernetes), stop every bus that asked,
 * gracefully (in-flight handlers finish and are acknowledged, leases are released, so another process takes
 * over at once instead of after the lease), then let the signal end the process as it would have without
 * us. Opt-in rather than by default: an application that already owns its shutdown (NestJS's
 * enableShutdownHooks, Fastify's close hooks, its own handlers) must not find a library's listener
 * suppressing Node's default exit or racing its own. Proven by test/lifecycle.pg.test.ts.
 */

const stopSignals = ['SIGINT', 'SIGTERM'] as const;

interface Stoppable {
  stop(): Promise<void>;
}

const buses = new Set<Stoppable>();

/** Adds `bus` to what the first SIGINT or SIGTERM stops; returns the function that takes it out again. */
export function stopOnSignals(bus: Stoppable): () => void {
  if (buses.size === 0) for (const signal of stopSignals) process.on(signal, onSignal);
  buses.add(bus);
  return () => {
    buses.delete(bus);
    if (buses.size === 0) removeListeners();
  };
}

function removeListeners(): void {
  for (const signal of stopSignals) process.off(signal, onSignal);
}

function onSignal(signal: NodeJS.Signals): void {
  // Our listeners go first: a second Ctrl-C meets Node's default and ends the process at once.
  removeListeners();
  const stopping = [...buses];
  buses.clear();
  process.stderr.write(
    `[tidings] ${signal}: stopping ${stopping.length === 1 ? 'the bus' : `${stopping.length} buses`} gracefully (${signal} again exits at once)\n`,
  );
  void Promise.allSettled(stopping.map((bus) => bus.stop())).then((outcomes) => {
    for (const outcome of outcomes) {
      if (outcome.status === 'rejected') {
        process.exitCode = 1;
        process.stderr.write(
          `[tidings] stopping on ${signal} failed: ${outcome.reason instanceof Error ? (outcome.reason.stack ?? outcome.reason.message) : String(outcome.reason)}\n`,
        );
      }
    }
    // Raised again for Node's default (the process ends by the signal), unless the application listens to
    // it too: then ending the process is its call.
    if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
  });
}
