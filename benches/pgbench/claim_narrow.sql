-- Candidate (not made): a lookup of three columns; the response would be read on a replay.
BEGIN \; SELECT pg_try_advisory_xact_lock(:k) \; EXECUTE pgidem_lookup_narrow(E'acct_1', E'k:k');
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
