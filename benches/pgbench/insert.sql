-- Written by hand to mirror src/sql.rs; pgbench variables persist per client, so the
-- statements are prepared once per connection.
\set k random(1, 1000000000000)
\if :prepared = 0
PREPARE pgidem_lookup_v1(text, text) AS SELECT fingerprint_version, encode(fingerprint, 'hex'), status, headers, encode(body, 'hex'), (extract(epoch FROM created_at) * 1000000)::bigint, expires_at > now() FROM idempotency_keys WHERE scope = $1 AND key = $2;
PREPARE pgidem_insert_v1(text, text, smallint, bytea, smallint, jsonb, bytea, bigint) AS INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, headers, body, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now() + $8 * interval '1 millisecond');
\set prepared 1
\endif
BEGIN;
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
EXECUTE pgidem_insert_v1(E'acct_1', E'k:k', 1, E'\\x2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', 201, E'[["content-type","application/json"]]', E'\\x7b226964223a227061795f303030313233222c22737461747573223a22737563636565646564222c22616d6f756e74223a313030302c2263757272656e6379223a22657572227d', 86400000) \; COMMIT;
