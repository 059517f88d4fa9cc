-- A first request on idempotency_keys (the crate's statements, prepare.sql in front), with
-- a random scope and a random UUID as the key.
\set s random(0, 999)
\set a random(1, 999999999999999999)
\set b random(1, 999999999999999999)
BEGIN \; SELECT pg_try_advisory_xact_lock(:a) \; EXECUTE pgidem_lookup_v3('acct_' || :s, md5(:a || '-' || :b)::uuid::text);
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
EXECUTE pgidem_insert('acct_' || :s, md5(:a || '-' || :b)::uuid::text, 1, E'\\x2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', 201, E'[["content-type","application/json"]]', E'\\x7b226964223a227061795f303030313233222c22737461747573223a22737563636565646564222c22616d6f756e74223a313030302c2263757272656e6379223a22657572227d', NULL, NULL, 86400000, E'req_01HZK2N5GQR9T8X4B6FJW3Y1AS', NULL, false) \; COMMIT;
