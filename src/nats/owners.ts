/**
 * Commands with one owner on NATS JetStream. A command is handled by one subscription: the first to start
 * with a handler for it records itself as the owner, and any other subscription that later starts with one
 * is refused (SUBSCRIPTION_CONFLICT naming both) before it makes a consumer, so `send` (a message on the
 * stream, read by every consumer whose filter takes its topic) reaches the owner's consumers only.
 * PostgreSQL keeps the same rule in its subscriptions table (postgres/consume/leases.ts); here the owner is
 * an entry of KV bucket `<stream>_owners`: key the command's topic, value the subscription's name.
 *
 * KV `create` writes a key only if it has no value (JetStream checks the subject's last sequence), so of two
 * subscriptions starting at once exactly one becomes the owner. The entry stays after the owner's processes
 * stop, as on PostgreSQL: a subscription gone for good is released with `nats kv del <stream>_owners
 * <command>`. (Test: the conformance suite's *a command has one owner*.)
 */
import type { KV } from '@nats-io/kv';
import type { SubscriptionSpec } from '../core/backbone.ts';
import { TidingsError } from '../core/errors.ts';
import { client } from './client.ts';
import type { NatsContext } from './context.ts';

function ownersBucket(ctx: NatsContext): string {
  return `${ctx.settings.stream}_owners`;
}

/** Records `spec` as the owner of each of its commands, or refuses it if another subscription owns one. */
export async function claimCommands(ctx: NatsContext, spec: SubscriptionSpec): Promise<void> {
  const commands = spec.commands ?? [];
  if (commands.length === 0) return;
  // Made (or opened: create is idempotent) when a subscription with a command starts; one request, at start only.
  const { replicas, publishTimeoutMs } = ctx.settings;
  const kv = await new (client().kv.Kvm)(ctx.js).create(ownersBucket(ctx), { history: 1, replicas, timeout: publishTimeoutMs });
  for (const command of commands) {
    const owner = await claim(kv, command, spec.name);
    if (owner !== spec.name) {
      throw new TidingsError(
        'SUBSCRIPTION_CONFLICT',
        `Command ${command} is handled by subscription ${owner} already; subscription ${spec.name} cannot take it too: a command has one owner (send delivers it once). Handle it in ${owner}, or, if that subscription is gone for good, release the command: nats kv del ${ownersBucket(ctx)} ${command}`,
        { ref: { topic: command } },
      );
    }
  }
}

/** The command's owner: `subscription` if it had none (now written), else the one recorded. */
async function claim(kv: KV, command: string, subscription: string): Promise<string> {
  const recorded = await kv.get(command);
  if (recorded !== null && recorded.operation === 'PUT') return recorded.string();
  try {
    await kv.create(command, subscription);
    return subscription;
  } catch (error) {
    // Another subscription created it between the read and the write: the one that got there first owns it.
    const winner = await kv.get(command);
    if (winner !== null && winner.operation === 'PUT') return winner.string();
    throw error;
  }
}
