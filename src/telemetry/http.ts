/**
 * `bus.health()` over HTTP, for Kubernetes' probes: `GET /livez` answers 200 while the process should keep
 * running and 503 once it should be restarted; `GET /readyz` answers 200 when the bus can do its work and 503
 * with the reasons when it cannot. The body is the health as JSON. A Node `http` handler and a Fetch API one
 * (Hono, Bun, Deno, Next.js); mount either beside your own routes. Proven by test/health.pg.test.ts.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { BusHealth, HealthOptions } from './health.ts';

export interface HealthPaths extends HealthOptions {
  /** The liveness probe's path (default `/livez`). */
  live?: string;
  /** The readiness probe's path (default `/readyz`). */
  ready?: string;
}

export const healthPaths = { live: '/livez', ready: '/readyz' } as const satisfies Required<Pick<HealthPaths, 'live' | 'ready'>>;

/** What the handlers need of a bus. `paths` also carries the checks' options (`timeoutMs`, `relayMaxAgeMs`). */
interface HasHealth {
  health(options?: HealthOptions): Promise<BusHealth>;
}

/** Status and body for `path`, or undefined when it is neither probe's path. */
async function answer(bus: HasHealth, path: string, paths: HealthPaths): Promise<{ status: number; body: string } | undefined> {
  const live = paths.live ?? healthPaths.live;
  const ready = paths.ready ?? healthPaths.ready;
  if (path !== live && path !== ready) return undefined;
  let health: BusHealth;
  try {
    health = await bus.health(paths);
  } catch (error) {
    return { status: 503, body: JSON.stringify({ live: false, ready: false, reasons: [`health check failed: ${(error as Error)?.message}`], checks: [] }) };
  }
  const ok = path === live ? health.live : health.ready;
  return { status: ok ? 200 : 503, body: JSON.stringify(health) };
}

/**
 * A Node `http` handler for the two probes. Another path gets 404, or goes to `next` if given (Express,
 * Connect): `app.use(healthHandler(bus))`.
 */
export function healthHandler(bus: HasHealth, paths: HealthPaths = {}) {
  return (request: IncomingMessage, response: ServerResponse, next?: () => void): void => {
    const path = (request.url ?? '/').split('?')[0] ?? '/';
    answer(bus, path, paths).then((result) => {
      if (result === undefined) {
        if (next !== undefined) return next();
        response.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' });
        response.end('not found\n');
        return;
      }
      response.writeHead(result.status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
      response.end(result.body);
    }, next);
  };
}

/** A Fetch API handler for the two probes; another path gets 404. */
export function healthFetch(bus: HasHealth, paths: HealthPaths = {}): (request: Request) => Promise<Response> {
  return async (request) => {
    const result = await answer(bus, new URL(request.url).pathname, paths);
    if (result === undefined) return new Response('not found\n', { status: 404 });
    return new Response(result.body, { status: result.status, headers: { 'content-type': 'application/json', 'cache-control': 'no-store' } });
  };
}
