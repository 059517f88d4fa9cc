-- pg-idempotency: the idempotency key store.
--
-- One row per (scope, key) that completed with a stored response. A request that is
-- still running holds a transaction-scoped advisory lock on its key instead of a row,
-- so the key row is written once, with its response, in the business transaction.

CREATE TABLE idempotency_keys (
    -- Tenant, account or principal that owns the key; part of the dedupe key.
    scope               text        NOT NULL CHECK (octet_length(scope) BETWEEN 1 AND 255),
    -- The Idempotency-Key value (canonical lower-case UUID under the default policy).
    key                 text        NOT NULL CHECK (octet_length(key) BETWEEN 1 AND 255),
    -- Algorithm version of `fingerprint`, so a later algorithm never breaks honest retries.
    fingerprint_version smallint    NOT NULL,
    -- SHA-256 over method, route and (canonicalised) body of the first request.
    fingerprint         bytea       NOT NULL CHECK (octet_length(fingerprint) = 32),
    -- The stored response.
    status              smallint    NOT NULL CHECK (status BETWEEN 100 AND 599),
    headers             jsonb       NOT NULL,
    body                bytea       NOT NULL,
    -- Database clock only.
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    PRIMARY KEY (scope, key),
    CHECK (expires_at > created_at)
);

-- Lets the sweeper find expired rows without a scan.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);

-- Claim a key: wait at most `wait_ms` for the transaction-scoped advisory lock that
-- serialises requests with the same key, then report what a completed request left.
-- Call it inside the transaction that will hold the claim.
--   state 'claimed': the lock is held and no live row exists; the other columns are NULL.
--   state 'done':    a live (unexpired) row exists; the lock is held too.
--   state 'busy':    another transaction held the lock for longer than `wait_ms`.
-- The caller's lock_timeout is restored, so its own statements are unaffected.
-- Bytes come back as hex and the time as microseconds since the epoch, so that the
-- client reads them from a simple query whatever bytea_output and DateStyle say.
CREATE FUNCTION idempotency_claim(p_lock bigint, p_wait_ms integer, p_scope text, p_key text)
RETURNS TABLE (
    state               text,
    fingerprint_version smallint,
    fingerprint_hex     text,
    status              smallint,
    headers             jsonb,
    body_hex            text,
    created_at_us       bigint
)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    saved_timeout text;
BEGIN
    IF NOT pg_try_advisory_xact_lock(p_lock) THEN
        IF p_wait_ms <= 0 THEN
            RETURN QUERY SELECT 'busy', NULL::smallint, NULL::text, NULL::smallint,
                                NULL::jsonb, NULL::text, NULL::bigint;
            RETURN;
        END IF;
        saved_timeout := current_setting('lock_timeout');
        BEGIN
            PERFORM set_config('lock_timeout', p_wait_ms::text, true);
            PERFORM pg_advisory_xact_lock(p_lock);
            PERFORM set_config('lock_timeout', saved_timeout, true);
        EXCEPTION WHEN lock_not_available THEN
            RETURN QUERY SELECT 'busy', NULL::smallint, NULL::text, NULL::smallint,
                                NULL::jsonb, NULL::text, NULL::bigint;
            RETURN;
        END;
    END IF;
    -- A fresh snapshot (VOLATILE): sees the row of a holder that committed while we waited.
    -- COLLATE "default": a parameter takes the collation of its argument, and some
    -- arguments carry another one (convert_from(..) returns COLLATE "C"); compared
    -- under another collation, the primary key cannot be used and the lookup reads
    -- every unexpired row.
    RETURN QUERY
        SELECT 'done', k.fingerprint_version, encode(k.fingerprint, 'hex'), k.status,
               k.headers, encode(k.body, 'hex'),
               (extract(epoch FROM k.created_at) * 1000000)::bigint
        FROM idempotency_keys AS k
        WHERE k.scope = p_scope COLLATE "default"
          AND k.key = p_key COLLATE "default"
          AND k.expires_at > now();
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'claimed', NULL::smallint, NULL::text, NULL::smallint,
                            NULL::jsonb, NULL::text, NULL::bigint;
    END IF;
END
$$;

-- Store the response of a claimed key. Replaces an expired row atomically; raises
-- (SQLSTATE PI001) instead of silently doing nothing if a live row is in the way,
-- so the surrounding COMMIT never commits a business write without its key.
CREATE FUNCTION idempotency_store(
    p_scope text, p_key text, p_fingerprint_version smallint, p_fingerprint bytea,
    p_status smallint, p_headers jsonb, p_body bytea, p_ttl_ms bigint
)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    INSERT INTO idempotency_keys AS k
        (scope, key, fingerprint_version, fingerprint, status, headers, body,
         created_at, expires_at)
    VALUES
        (p_scope, p_key, p_fingerprint_version, p_fingerprint, p_status, p_headers, p_body,
         now(), now() + make_interval(secs => p_ttl_ms / 1000.0))
    ON CONFLICT (scope, key) DO UPDATE
        SET fingerprint_version = EXCLUDED.fingerprint_version,
            fingerprint         = EXCLUDED.fingerprint,
            status              = EXCLUDED.status,
            headers             = EXCLUDED.headers,
            body                = EXCLUDED.body,
            created_at          = EXCLUDED.created_at,
            expires_at          = EXCLUDED.expires_at
        WHERE k.expires_at <= now();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency key (%, %) is already stored and unexpired', p_scope, p_key
            USING ERRCODE = 'PI001';
    END IF;
END
$$;

-- Delete at most `p_batch` expired rows, skipping rows other transactions hold, and
-- return how many were deleted. The Rust sweeper, the CLI and pg_cron all call this.
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
