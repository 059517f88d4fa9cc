-- pg-idempotency 0.1.0: the idempotency key store.
--
-- One row per (scope, key) that completed with a stored response. A request that is still
-- running holds a transaction-scoped advisory lock on its key instead of a row, so the key
-- row is written once, with its response, inside the business transaction: both commit or
-- neither does.
--
-- From 0.1.0 on this file never changes; later schema changes are new migrations.
-- The objects live in the schema that `search_path` names when the migration runs
-- (usually `public`), like the application's own tables: docs/OPERATIONS.md, "Schema".

CREATE TABLE idempotency_keys (
    scope               text        NOT NULL,
    key                 text        NOT NULL,
    fingerprint_version smallint    NOT NULL,
    fingerprint         bytea       NOT NULL,
    status              smallint    NOT NULL,
    headers             jsonb       NOT NULL,
    body                bytea       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    -- No CHECK constraints: each costs the hot insert 6-40 % of its server instructions;
    -- docs/OPERATIONS.md, "The schema", has the figures and the decision.
    PRIMARY KEY (scope, key)
);

COMMENT ON TABLE idempotency_keys IS
    'pg-idempotency: the stored response of each completed request, by (scope, key); '
    'written in the same transaction as the business write. Rows past expires_at count as '
    'unused and are deleted by idempotency_sweep.';
COMMENT ON COLUMN idempotency_keys.scope IS
    'Tenant, account or principal that owns the key; part of the dedupe key.';
COMMENT ON COLUMN idempotency_keys.key IS
    'The idempotency key (canonical lower-case UUID v4 under the default key policy).';
COMMENT ON COLUMN idempotency_keys.fingerprint_version IS
    'Algorithm version of fingerprint, so that a later algorithm never breaks honest retries.';
COMMENT ON COLUMN idempotency_keys.fingerprint IS
    'SHA-256 of the first request (method, route, canonical body); a retry must match it.';
COMMENT ON COLUMN idempotency_keys.status IS 'The stored response''s status code.';
COMMENT ON COLUMN idempotency_keys.headers IS
    'The stored response''s headers: a JSON array of [name, value] pairs, in order.';
COMMENT ON COLUMN idempotency_keys.body IS 'The stored response''s body bytes.';
COMMENT ON COLUMN idempotency_keys.created_at IS
    'When the key was first used (database clock); named in the 409 conflict answer.';
COMMENT ON COLUMN idempotency_keys.expires_at IS
    'End of the replay window (database clock): created_at + the store''s TTL.';

-- Lets the sweeper find expired rows without a scan.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
COMMENT ON INDEX idempotency_keys_expires_at_idx IS
    'Lets idempotency_sweep find expired rows without reading the whole table.';

-- Wait at most p_wait_ms for the transaction-scoped advisory lock p_lock. A plain
-- `SET LOCAL lock_timeout` + `pg_advisory_xact_lock` would abort the caller's transaction
-- on timeout; this keeps it usable, so the claim can still read a row the holder committed
-- at the last moment.
CREATE FUNCTION idempotency_wait_lock(p_lock bigint, p_wait_ms integer)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    saved_timeout text := current_setting('lock_timeout');
BEGIN
    IF pg_try_advisory_xact_lock(p_lock) THEN
        RETURN true;
    END IF;
    IF p_wait_ms <= 0 THEN
        RETURN false;
    END IF;
    BEGIN
        PERFORM set_config('lock_timeout', p_wait_ms::text, true);
        PERFORM pg_advisory_xact_lock(p_lock);
        PERFORM set_config('lock_timeout', saved_timeout, true);
        RETURN true;
    EXCEPTION WHEN lock_not_available THEN
        -- The subtransaction rolled back, and with it the lock_timeout it set.
        RETURN false;
    END;
END
$$;
COMMENT ON FUNCTION idempotency_wait_lock(bigint, integer) IS
    'pg-idempotency: a duplicate request waits, bounded, for the request holding its key. '
    'True once the transaction-scoped advisory lock is held, false after p_wait_ms; the '
    'caller''s transaction stays usable and its lock_timeout unchanged.';

-- Delete at most p_batch expired rows, skipping rows other transactions hold.
CREATE FUNCTION idempotency_sweep(p_batch integer)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    WITH deleted AS (
        DELETE FROM idempotency_keys
        WHERE ctid = ANY (ARRAY(
                SELECT ctid FROM idempotency_keys
                WHERE expires_at <= now()
                LIMIT p_batch
                FOR UPDATE SKIP LOCKED))
          AND expires_at <= now()
        RETURNING 1
    )
    SELECT count(*) FROM deleted;
$$;
COMMENT ON FUNCTION idempotency_sweep(integer) IS
    'pg-idempotency: deletes at most p_batch expired rows, skipping rows other transactions '
    'hold, and returns how many it deleted. Called by the crate''s sweeper, its CLI, and '
    'pg_cron (SELECT idempotency_sweep(1000)).';
