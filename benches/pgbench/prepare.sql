-- Prepended by run.sh to every script. The PREPARE lines are src/db/hot_path.rs's statements
-- (a unit test there checks it); pgbench variables persist per client, so they are
-- prepared once per connection.
\set k random(1, 1000000000000)
\if :prepared = 0
PREPARE pgidem_lookup_v3(text, text) AS SELECT fingerprint_version, encode(fingerprint, 'hex'), status, headers, encode(body, 'hex'), (extract(epoch FROM created_at) * 1000000)::bigint, expires_at > now(), request_id, traceparent, body_omitted FROM idempotency_keys WHERE scope = $1 AND key = $2;
-- Candidates of issue 14 that the crate does not send (docs/BENCHMARKS.md, "Measured and
-- not made"): the lock folded into the lookup, and a narrow lookup.
PREPARE pgidem_claim_fused(bigint, text, text) AS SELECT pg_try_advisory_xact_lock($1), k.fingerprint_version, encode(k.fingerprint, 'hex'), k.status, k.headers, encode(k.body, 'hex'), (extract(epoch FROM k.created_at) * 1000000)::bigint, k.expires_at > now(), k.request_id, k.traceparent, k.body_omitted FROM (VALUES (1)) AS one LEFT JOIN idempotency_keys k ON k.scope = $2 AND k.key = $3;
PREPARE pgidem_lookup_narrow(text, text) AS SELECT fingerprint_version, fingerprint, expires_at > now() FROM idempotency_keys WHERE scope = $1 AND key = $2;
-- The key row's insert, as src/db/hot_path.rs sends it (bound parameters, sqlx prepares it).
PREPARE pgidem_insert(text, text, smallint, bytea, smallint, jsonb, bytea, timestamptz, timestamptz, bigint, text, text, boolean) AS INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, headers, body, created_at, expires_at, request_id, traceparent, body_omitted) VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), coalesce($9, now() + $10::bigint * interval '1 millisecond'), $11, $12, $13) RETURNING created_at;
\set prepared 1
\endif
