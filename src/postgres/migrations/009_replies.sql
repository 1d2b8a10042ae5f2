-- Answers to bus.request: written in the handler's transaction (so one exists iff the request was
-- acknowledged), read and deleted by the process waiting for it (replies.ts). Answers nobody waits for
-- any more (a request that timed out) are pruned by retention.
create table {{schema}}.replies (
  request_id text primary key,
  data jsonb,
  error jsonb,
  created_at timestamptz not null default now()
);
create index replies_created_at on {{schema}}.replies (created_at);
