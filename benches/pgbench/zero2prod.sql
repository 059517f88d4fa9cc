-- The zero2prod shape (benches/throughput/paths.rs, path 2): five round trips, the key row
-- inserted, then updated with the response. pgbench runs it in simple protocol.
BEGIN;
INSERT INTO idem_z2p (scope, key, fingerprint_version, fingerprint, created_at, expires_at) VALUES ('acct_1', 'k:k', 1, '\x2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', now(), now() + interval '24 hours') ON CONFLICT DO NOTHING;
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
UPDATE idem_z2p SET status = 201, headers = '[["content-type","application/json"]]', body = '\x7b226964223a227061795f303030313233222c22737461747573223a22737563636565646564222c22616d6f756e74223a313030302c2263757272656e6379223a22657572227d' WHERE scope = 'acct_1' AND key = 'k:k';
COMMIT;
