-- Candidate (not made): the lock folded into the lookup, one statement and one result set.
BEGIN \; EXECUTE pgidem_claim_fused(:k, E'acct_1', E'k:k');
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
