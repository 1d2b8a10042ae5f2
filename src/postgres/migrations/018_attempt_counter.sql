-- Closes the savepoint hole of row-level security (issue 23; docs/tenancy.md, postgres/tenants.ts). Migration
-- 013 binds a scope's proof to the transaction: within one batch transaction, handler SQL that plants a
-- savepoint outside its attempt (`RELEASE tidings_attempt; SAVEPOINT x; SAVEPOINT tidings_attempt`) lets a
-- later handler of another tenant `ROLLBACK TO x` and be back in the planter's scope, its proof still good.
-- Settings are transactional and so is everything a rollback can reach; a sequence is not. So each scope
-- entered now advances `tenancy_entries` (nextval, in this session) and its proof is bound to that value too:
-- the policies' tenancy_scope() compares it with the session's currval, so a scope brought back by a rollback
-- (or a proof kept from an earlier attempt) is bound to an older entry and proves nothing: nothing is visible.
-- The restricted role has no right on the sequence (it can neither advance nor read it); it enters a scope
-- through tenancy_enter(), which asks for the consumer's ticket: the 013 proof of the scope in this
-- transaction, computed by the consumer with the key, sent as a parameter, never stored in a setting.
create sequence {{schema}}.tenancy_entries as bigint;
revoke all on sequence {{schema}}.tenancy_entries from public;
-- Enters `scope` for what runs next in this transaction, if `ticket` proves the consumer sent it; else refused.
create function {{schema}}.tenancy_enter(scope text, ticket text) returns void language plpgsql volatile security definer set search_path = pg_catalog as $$ declare secret bytea := (select k.secret from {{schema}}.tenancy_key k); bound text := scope || '/' || pg_current_xact_id()::text; begin if ticket is distinct from encode(sha256(secret || sha256(secret || convert_to(bound, 'UTF8'))), 'hex') then raise exception 'tidings: tenancy_enter refused: the ticket does not prove scope %', scope using errcode = '42501'; end if; bound := bound || '#' || nextval('{{schema}}.tenancy_entries')::text; perform set_config('tidings.scope', scope, true), set_config('tidings.proof', encode(sha256(secret || sha256(secret || convert_to(bound, 'UTF8'))), 'hex'), true); end $$;
-- The scope in force: 'all' for any session not logged in as a restricted role, else the scope whose proof
-- is bound to this transaction and to the session's last entry, else null (nothing is visible). The proof is
-- compared first, so currval is asked only in a session that has a proof set (error if it never entered one).
create or replace function {{schema}}.tenancy_scope() returns text language sql stable security definer set search_path = pg_catalog as $$ select case when not exists (select from {{schema}}.tenancy_roles r where r.role = session_user) then 'all' when coalesce(current_setting('tidings.proof', true), '') = '' then null when current_setting('tidings.proof', true) = encode(sha256(k.secret || sha256(k.secret || convert_to(coalesce(current_setting('tidings.scope', true), '') || '/' || coalesce(pg_current_xact_id_if_assigned()::text, '-') || '#' || currval('{{schema}}.tenancy_entries')::text, 'UTF8'))), 'hex') then current_setting('tidings.scope', true) end from {{schema}}.tenancy_key k $$;
