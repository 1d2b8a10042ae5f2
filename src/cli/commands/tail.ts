/** `tidings tail <topic>`: follow a topic's messages as they commit. */
import type { Command } from 'commander';
import { firstPositionAt, tailTopic } from 'tidings/postgres';
import { parseFrom, positiveInteger, type From } from '../arguments.ts';
import type { CliContext } from '../context.ts';
import { withDatabase, type Database } from '../database.ts';
import { listed, shortTime } from '../format.ts';

export function registerTail(program: Command, context: CliContext): void {
  program
    .command('tail')
    .description('follow the messages of a topic as they are committed (Ctrl-C to stop)')
    .argument('<topic>', 'the topic (contract name), for example orders.order-placed')
    .option('--key <key>', 'only messages with this partition key')
    .option('--type <type>', 'only messages of this CloudEvents type, for example orders.order-placed.v2')
    .option('--tenant <tenant>', 'only messages of this tenant')
    .option('--grep <text>', "only messages whose data's JSON contains this text (any case)")
    .option('--from <position|time>', 'begin at a log position or an ISO time instead of now', parseFrom)
    .option('--limit <count>', 'stop after this many messages', positiveInteger)
    .action(async (topic: string, options: TailCommandOptions, command: Command) => {
      await withDatabase(context, command, async (db, globals) => {
        const fromPosition = options.from === undefined ? undefined : await positionOf(db, globals.schema, options.from, [topic]);
        const unknown = await unknownTopic(db, globals.schema, topic);
        if (unknown !== undefined) context.err(`${unknown}\n`);
        if (!globals.json) context.err(`Following ${topic} in schema ${globals.schema} at ${db.description} (Ctrl-C to stop)\n`);
        const stop = new AbortController();
        const onInterrupt = () => stop.abort();
        context.interrupt.addEventListener('abort', onInterrupt, { once: true });
        let count = 0;
        try {
          for await (const { position, envelope } of tailTopic(db.driver, {
            schema: globals.schema,
            topic,
            key: options.key,
            type: options.type,
            tenant: options.tenant,
            grep: options.grep,
            fromPosition,
            signal: stop.signal,
          })) {
            if (globals.json) context.out(`${JSON.stringify({ position, ...envelope })}\n`);
            else {
              const extra = [
                envelope.tenant === undefined ? '' : `tenant=${envelope.tenant}`,
                envelope.subject === undefined ? '' : `subject=${envelope.subject}`,
              ];
              context.out(
                `#${position}  ${shortTime(envelope.time)}  ${envelope.type}  key=${envelope.partitionkey}  id=${envelope.id}  ${extra.filter(Boolean).join('  ')}${extra.some(Boolean) ? '  ' : ''}${JSON.stringify(envelope.data)}\n`,
              );
            }
            if (options.limit !== undefined && ++count >= options.limit) break;
          }
        } finally {
          context.interrupt.removeEventListener('abort', onInterrupt);
        }
      });
    });
}

interface TailCommandOptions {
  key?: string;
  type?: string;
  tenant?: string;
  grep?: string;
  from?: From;
  limit?: number;
}

async function positionOf(db: Database, schema: string, from: From, topics: string[]): Promise<number> {
  if (from.kind === 'position') return from.position;
  return firstPositionAt(db.driver, { schema, time: from.time, topics });
}

/** How many of the newest messages `tail` looks through for a topic no subscription handles: a bounded read. */
const RECENT_MESSAGES = 10_000;

/**
 * A warning when `topic` looks misspelt: no subscription handles it and none of the newest messages has
 * it. (Not the whole log: on a large one, a topic that is not there would cost a full scan.)
 */
async function unknownTopic(db: Database, schema: string, topic: string): Promise<string | undefined> {
  const s = `"${schema}"`;
  const { rows: handled } = await db.driver.query<{ topic: string }>(`select distinct unnest(topics) as topic from ${s}.subscriptions order by 1`);
  if (handled.some((row) => row.topic === topic)) return undefined;
  const { rows: recent } = await db.driver.query<{ seen: boolean }>(
    `select exists (select 1 from (select topic from ${s}.log order by position desc limit ${RECENT_MESSAGES}) newest where topic = $1) as seen`,
    [topic],
  );
  if (recent[0]?.seen === true) return undefined;
  const known = handled.map((row) => row.topic);
  return `Warning: no subscription handles ${topic}, and none of the newest ${RECENT_MESSAGES.toLocaleString('en')} messages has it: check the name${known.length === 0 ? '' : ` (the subscriptions handle ${listed(known, 10)})`}. Waiting for it all the same.`;
}
