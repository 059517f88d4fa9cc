-- pg-idempotency: the hot path moves from PL/pgSQL calls to prepared statements.
--
-- The claim and the completion are now plain statements that the crate prepares once per
-- connection (src/sql.rs): `SELECT pg_try_advisory_xact_lock(..)`, a lookup by primary
-- key, and a plain INSERT. Their plans are cached, where a PL/pgSQL call paid for
-- parsing, planning and the function call on every request (docs/BENCHMARKS.md). Only
-- the contended case, waiting for another holder of the key, still needs a function.
--
-- idempotency_claim and idempotency_store are no longer called, but stay for one release:
-- during a rolling deploy, nodes of the previous version still call them, and they work
-- beside the new statements (same advisory lock, same rows). A later migration drops them.

-- Wait at most `p_wait_ms` for the transaction-scoped advisory lock `p_lock`; true once it
-- is held, false if another transaction still held it when the time ran out (the caller's
-- transaction stays usable). The caller's lock_timeout is restored either way.
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

-- The CHECK constraints cost each insert about 5% of the server's CPU (the executor
-- rebuilds their expressions for every statement) and guard states the only writer
-- cannot produce: the crate validates scope and key lengths, the status range and the
-- TTL before it writes, and a fingerprint is 32 bytes by type. NOT NULL and the primary
-- key stay.
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_scope_check,
    DROP CONSTRAINT idempotency_keys_key_check,
    DROP CONSTRAINT idempotency_keys_fingerprint_check,
    DROP CONSTRAINT idempotency_keys_status_check,
    DROP CONSTRAINT idempotency_keys_check;
