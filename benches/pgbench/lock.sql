BEGIN \; SELECT pg_try_advisory_xact_lock(:k);
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
