-- The first request as session 1 sent it, through the PL/pgSQL functions that migration
-- 20261129000001 keeps for rolling deploys (for the before/after line in
-- docs/BENCHMARKS.md; goes when a later migration drops them).
BEGIN \; SELECT * FROM idempotency_claim(:k, 2000, E'acct_1', E'k:k');
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
SELECT idempotency_store(E'acct_1', E'k:k', 1::smallint, E'\\x2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', 201::smallint, E'[["content-type","application/json"]]', E'\\x7b226964223a227061795f303030313233222c22737461747573223a22737563636565646564222c22616d6f756e74223a313030302c2263757272656e6379223a22657572227d', 86400000) \; COMMIT;
