-- tenancy_scope() as PL/pgSQL: same answers as migration 018's, at a tenth of the cost. A SQL function that
-- cannot be inlined (security definer, its own search_path) is parsed and planned again at every call before
-- PostgreSQL 18, and every statement a restricted role runs on a table under row-level security calls it once
-- (~50 us on this project's bench machine); PL/pgSQL keeps its statements' plans for the session (~5 us
-- outside a restricted session, ~15 us inside one). The proof is compared only once one is set, so currval is
-- asked only in a session that has a proof (an error if it never entered a scope, as before).
create or replace function {{schema}}.tenancy_scope() returns text language plpgsql stable security definer set search_path = pg_catalog as $$ declare proof text; begin if not exists (select from {{schema}}.tenancy_roles r where r.role = session_user) then return 'all'; end if; proof := current_setting('tidings.proof', true); if coalesce(proof, '') = '' then return null; end if; return (select case when proof = encode(sha256(k.secret || sha256(k.secret || convert_to(coalesce(current_setting('tidings.scope', true), '') || '/' || coalesce(pg_current_xact_id_if_assigned()::text, '-') || '#' || currval('{{schema}}.tenancy_entries')::text, 'UTF8'))), 'hex') then current_setting('tidings.scope', true) end from {{schema}}.tenancy_key k); end $$;
