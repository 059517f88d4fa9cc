-- pg-idempotency: stored responses without their body (issue 23).
--
-- A response whose body is over the store's cap (Config::with_stored_body_cap, 1 MiB by
-- default) still completes its request: the row keeps its status and headers, the body
-- column holds no bytes, and this flag says that the body was omitted, so that a replay
-- can say so instead of passing an empty body off as the original.
--
-- A constant default is stored in the catalog: adding the column rewrites nothing. Rows
-- written before, or by a node that does not know the column yet (rolling deploys), are
-- complete responses: false.
--
-- One DO block, a single command, for Citus (see 20261204000002_provenance.sql).
DO $$
BEGIN
    ALTER TABLE idempotency_keys
        ADD COLUMN body_omitted boolean NOT NULL DEFAULT false;

    COMMENT ON COLUMN idempotency_keys.body_omitted IS
        'True when the response body was over the store''s cap and was not stored (body is '
        'empty); a replay then answers status and headers and says the body was omitted.';
END
$$;
