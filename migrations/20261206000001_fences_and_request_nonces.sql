-- pg-idempotency: fences that are never reused, and downstream keys bound to one request.
--
-- A holder's fencing token is now drawn at random from 2^63 values at every grant (a new
-- request, a takeover), instead of counting from 1 on each new row: a row that is
-- deleted (forget, the completer, the sweep) and created again never hands out a token
-- that a holder of the old row still has. Nothing in the schema changes for that; the
-- comment says what the column holds now.
--
-- request_nonce: a random value the request's row gets when it is created and keeps
-- through every takeover. The downstream keys of the request's steps are derived from it,
-- so a new request with the same idempotency key (after expiry, after `forget`, after the
-- completer freed it) sends the downstream system keys it has never seen. Rows created
-- before this migration have none, and keep the downstream keys they had.

ALTER TABLE idempotency_requests ADD COLUMN IF NOT EXISTS request_nonce uuid;

COMMENT ON COLUMN idempotency_requests.lease_token IS
    'Fencing token, drawn at random at every grant (the first holder''s and every '
    'takeover''s). A holder writes only while the row still has the token it was granted.';
COMMENT ON COLUMN idempotency_requests.request_nonce IS
    'Drawn at random when the row is created, kept through takeovers: the downstream keys '
    'of the request''s steps are derived from it (NULL: a row created before it existed, '
    'whose downstream keys come from its scope and key alone).';
