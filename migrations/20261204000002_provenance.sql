-- pg-idempotency: provenance of stored responses (issue 11).
--
-- The request id of the request whose response is stored, and its W3C `traceparent` when
-- it had one, so that a replay can say which request it replays, a conflict can name the
-- first request, and an operator can find it in the logs and traces.
--
-- Nullable without a default: adding them rewrites nothing (a catalog change only), and rows
-- written before, or by a node that does not know these columns yet (rolling deploys: the
-- 0.1.0 statements name their columns), simply have none.
--
-- One DO block, so that the file is a single command: sqlx sends a migration as one
-- string, and Citus refuses DDL on a distributed table (an idempotency_keys distributed
-- under 0.1.0) inside a string of several commands; inside a block it propagates it.
DO $$
BEGIN
    ALTER TABLE idempotency_keys
        ADD COLUMN request_id  text,
        ADD COLUMN traceparent text;

    COMMENT ON COLUMN idempotency_keys.request_id IS
        'Request id of the request that produced the stored response (NULL if unknown); a '
        'replay names it in its Idempotent-Replay-Of header.';
    COMMENT ON COLUMN idempotency_keys.traceparent IS
        'W3C traceparent of the request that produced the stored response, when it had one.';
END
$$;
