-- Lock, the crate's lookup on :table, a business insert, commit: what partitions by time
-- would cost a claim that cannot name its partition. Run with -D table=idem_s or idem_p.
\set s random(0, 999)
\set a random(1, 999999999999999999)
\set b random(1, 999999999999999999)
\if :prepared = 0
PREPARE lk(text, text) AS SELECT fingerprint_version, encode(fingerprint, 'hex'), status, headers, encode(body, 'hex'), (extract(epoch FROM created_at) * 1000000)::bigint, expires_at > now(), request_id, traceparent, body_omitted FROM :table WHERE scope = $1 AND key = $2;
\set prepared 1
\endif
BEGIN \; SELECT pg_try_advisory_xact_lock(:a) \; EXECUTE lk('acct_' || :s, md5(:a || '-' || :b)::uuid::text);
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
