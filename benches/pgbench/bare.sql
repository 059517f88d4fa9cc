BEGIN;
INSERT INTO payments (account, amount) VALUES ('acct_1', 1000);
COMMIT;
