/** The bus every Tidings-on-PostgreSQL child makes: the compiled build, the benchmark's schema (dropped by each task). */
import type { Bus } from '../../src/index.ts';
import type { PgTransaction } from '../../src/postgres/index.ts';
import type { Task } from '../protocol.ts';
import { tidings } from './build.ts';
import { telemetryOf } from './telemetry.ts';

const { createBus } = await tidings<typeof import('../../src/index.ts')>('index');
const { postgres } = await tidings<typeof import('../../src/postgres/index.ts')>('postgres/index');

export const SCHEMA = 'tidings_bench';

export function newBus(task: Task, service = 'bench'): Bus<PgTransaction> {
  return createBus({ service, backbone: postgres({ url: task.pgUrl, schema: SCHEMA }), telemetry: telemetryOf(task.variant) });
}
