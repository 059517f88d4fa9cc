-- The claim as the crate sends it (lock, then lookup, behind BEGIN), the business insert,
-- COMMIT: the baseline of the two candidates below.
BEGIN \; SELECT pg_try_advisory_xact_lock(:k) \; EXECUTE pgidem_lookup_v3(E'acct_1', E'k:k');
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
