-- The same first request on idem_u, the key as uuid.
\set s random(0, 999)
\set a random(1, 999999999999999999)
\set b random(1, 999999999999999999)
\if :prepared = 0
PREPARE u_lookup(text, uuid) AS SELECT fingerprint_version, encode(fingerprint, 'hex'), status, headers, encode(body, 'hex'), (extract(epoch FROM created_at) * 1000000)::bigint, expires_at > now(), request_id, traceparent, body_omitted FROM idem_u WHERE scope = $1 AND key = $2;
PREPARE u_insert(text, uuid, smallint, bytea, smallint, jsonb, bytea, timestamptz, timestamptz, bigint, text, text, boolean) AS INSERT INTO idem_u (scope, key, fingerprint_version, fingerprint, status, headers, body, created_at, expires_at, request_id, traceparent, body_omitted) VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now()), coalesce($9, now() + $10::bigint * interval '1 millisecond'), $11, $12, $13) RETURNING created_at;
\set prepared 1
\endif
BEGIN \; SELECT pg_try_advisory_xact_lock(:a) \; EXECUTE u_lookup('acct_' || :s, md5(:a || '-' || :b)::uuid);
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
EXECUTE u_insert('acct_' || :s, md5(:a || '-' || :b)::uuid, 1, E'\\x2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', 201, E'[["content-type","application/json"]]', E'\\x7b226964223a227061795f303030313233222c22737461747573223a22737563636565646564222c22616d6f756e74223a313030302c2263757272656e6379223a22657572227d', NULL, NULL, 86400000, E'req_01HZK2N5GQR9T8X4B6FJW3Y1AS', NULL, false) \; COMMIT;
