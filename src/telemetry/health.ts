/**
 * `bus.health()`: whether the process is live (restart it if not) and ready (it can do its work now), with
 * the reason when it is not, for Kubernetes' liveness and readiness probes (http.ts serves them).
 *
 * Live: the bus is not stopped and no subscription failed to start. Ready: live, started (a bus without
 * subscriptions or schedules only publishes and needs no start), and every check the backbone reports passes
 * (database or broker reachable, the notifier listening or polling) and, for a broker with an outbox, the
 * relay keeps up (its oldest unrelayed message is younger than `relayMaxAgeMs`).
 */
import type { Backbone } from '../core/backbone.ts';
import type { BackboneStatus, HealthCheck } from './status.ts';

export const healthDefaults = {
  /** A check that takes longer fails: a probe must answer before Kubernetes' own timeout (1 s by default, often raised). */
  timeoutMs: 2_000,
  /** The relay is behind when the oldest outbox message it has not handed over is older than this. */
  relayMaxAgeMs: 60_000,
} as const;

export interface BusHealth {
  /** The process should keep running: false once the bus stopped, or a subscription failed to start. */
  readonly live: boolean;
  /** The bus can do its work now: started, and every check passes. */
  readonly ready: boolean;
  /** Why it is not live or not ready; empty when it is both. */
  readonly reasons: readonly string[];
  /** What was checked, and what was found. */
  readonly checks: readonly HealthCheck[];
}

export interface HealthOptions {
  /** A check that takes longer fails (default `healthDefaults.timeoutMs`). */
  timeoutMs?: number;
  /** The relay is behind when its oldest waiting message is older than this (default `healthDefaults.relayMaxAgeMs`). */
  relayMaxAgeMs?: number;
}

interface HealthInputs {
  readonly state: 'idle' | 'starting' | 'running' | 'stopping' | 'stopped';
  /** The bus has subscriptions or schedules: it is ready only once started. Without, it only publishes, and needs no start. */
  readonly consumes: boolean;
  /** The backbone is open (by a start, or a publishing bus's first publish). */
  readonly opened: boolean;
  /** Errors of subscriptions that failed to start in the background. */
  readonly failures: readonly unknown[];
  readonly backbone: Backbone<unknown>;
  /** The backbone's status, cached (telemetry.ts). */
  readonly status: () => Promise<BackboneStatus | undefined>;
}

export async function busHealth(inputs: HealthInputs, options: HealthOptions = {}): Promise<BusHealth> {
  const timeoutMs = options.timeoutMs ?? healthDefaults.timeoutMs;
  const relayMaxAgeMs = options.relayMaxAgeMs ?? healthDefaults.relayMaxAgeMs;
  const publishing = !inputs.consumes && inputs.state === 'idle';
  const working = inputs.state === 'running' || publishing;
  const checks: HealthCheck[] = [
    {
      name: 'bus',
      ok: working,
      detail:
        inputs.state === 'running'
          ? 'running'
          : publishing
            ? 'publishing only'
            : `the bus is ${inputs.state}${inputs.state === 'idle' ? ': call bus.start()' : ''}`,
    },
  ];
  for (const failure of inputs.failures) {
    checks.push({ name: 'subscription', ok: false, detail: `a subscription failed to start: ${(failure as Error)?.message ?? String(failure)}` });
  }
  const live = inputs.state !== 'stopping' && inputs.state !== 'stopped' && inputs.failures.length === 0;
  // A publishing bus opens its backbone at its first publish; until then there is nothing to check (a
  // check must not be what opens it: an open that fails would stay failed).
  if (working && inputs.opened) {
    const [reported, status] = await Promise.all([
      within(timeoutMs, inputs.backbone.health?.() ?? Promise.resolve([]), 'the backbone did not answer its health check'),
      within(timeoutMs, inputs.status(), 'the backbone did not report its status'),
    ]);
    if (reported instanceof Error) checks.push({ name: 'backbone', ok: false, detail: reported.message });
    else checks.push(...reported);
    const relay = status instanceof Error ? undefined : status?.relay;
    if (relay !== undefined) {
      const age = relay.oldestAgeMs ?? 0;
      checks.push({
        name: 'relay',
        ok: age <= relayMaxAgeMs,
        detail:
          age <= relayMaxAgeMs
            ? `${relay.backlog} message(s) to relay`
            : `the relay is behind: ${relay.backlog} message(s) wait, the oldest for ${age} ms (more than ${relayMaxAgeMs} ms)`,
      });
    }
  }
  const reasons = checks.filter((check) => !check.ok).map((check) => `${check.name}: ${check.detail}`);
  return { live, ready: live && reasons.length === 0, reasons, checks };
}

/** What `work` settles to, or an Error saying `late` after `ms`. */
async function within<T>(ms: number, work: Promise<T>, late: string): Promise<T | Error> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<Error>((resolve) => {
    timer = setTimeout(() => resolve(new Error(`${late} within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([work.catch((error: unknown) => (error instanceof Error ? error : new Error(String(error)))), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
