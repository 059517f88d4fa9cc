-- pg-idempotency: phased requests (exactly-once across external calls).
--
-- A phased request commits its progress step by step, so unlike a transactional claim it
-- needs a row while it runs: one row per (scope, key) of a phased request in progress.
-- Each step's output is recorded in `progress` in the same transaction as the step's own
-- writes; a retry (or the completer) that takes the request over resumes after the last
-- recorded step. The final step deletes this row and writes the response into
-- idempotency_keys, in one transaction, where replays read it as for any other request.

CREATE TABLE idempotency_requests (
    scope               text        NOT NULL,
    key                 text        NOT NULL,
    fingerprint_version smallint    NOT NULL,
    fingerprint         bytea       NOT NULL,
    operation           text,
    input               jsonb,
    recovery_point      text,
    progress            jsonb       NOT NULL DEFAULT '{}',
    lease_token         bigint      NOT NULL,
    leased_until        timestamptz NOT NULL,
    attempts            integer     NOT NULL DEFAULT 1,
    request_id          text,
    traceparent         text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);

COMMENT ON TABLE idempotency_requests IS
    'pg-idempotency: phased requests in progress, by (scope, key). The final step deletes '
    'the row and stores the response in idempotency_keys in the same transaction.';
COMMENT ON COLUMN idempotency_requests.fingerprint IS
    'SHA-256 of the first request (see idempotency_keys.fingerprint); a retry must match it.';
COMMENT ON COLUMN idempotency_requests.operation IS
    'Name of the operation that runs the request (NULL until it starts): the completer '
    'finds the step functions by it.';
COMMENT ON COLUMN idempotency_requests.input IS
    'The operation''s input (JSON), recorded before its first step, so that the completer '
    'can finish a request whose client never came back.';
COMMENT ON COLUMN idempotency_requests.recovery_point IS
    'Name of the last step whose result is recorded (NULL: none yet).';
COMMENT ON COLUMN idempotency_requests.progress IS
    'Recorded step results: a JSON object from step name to the step''s output.';
COMMENT ON COLUMN idempotency_requests.lease_token IS
    'Fencing token: incremented at every takeover. A holder records a step only while the '
    'token is still the one it took.';
COMMENT ON COLUMN idempotency_requests.leased_until IS
    'The holder''s lease ends here (database clock); after it, a retry or the completer may '
    'take the request over.';
COMMENT ON COLUMN idempotency_requests.attempts IS
    'How many holders have taken the request (1 + takeovers).';
COMMENT ON COLUMN idempotency_requests.request_id IS
    'Request id of the request that started the operation (NULL if unknown); stored with '
    'the response, whoever finishes the request.';
COMMENT ON COLUMN idempotency_requests.traceparent IS
    'W3C traceparent of the request that started the operation, when it had one.';
COMMENT ON COLUMN idempotency_requests.created_at IS
    'When the key was first used (database clock).';
COMMENT ON COLUMN idempotency_requests.expires_at IS
    'End of the replay window: after it the request counts as abandoned and unused, and '
    'idempotency_sweep deletes it.';

CREATE INDEX idempotency_requests_leased_until_idx ON idempotency_requests (leased_until);
COMMENT ON INDEX idempotency_requests_leased_until_idx IS
    'Lets the completer find requests whose holder''s lease ended.';
CREATE INDEX idempotency_requests_expires_at_idx ON idempotency_requests (expires_at);
COMMENT ON INDEX idempotency_requests_expires_at_idx IS
    'Lets idempotency_sweep find abandoned requests past their replay window.';
