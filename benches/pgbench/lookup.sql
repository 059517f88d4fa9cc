BEGIN \; EXECUTE pgidem_lookup_v3(E'acct_1', E'k:k');
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
