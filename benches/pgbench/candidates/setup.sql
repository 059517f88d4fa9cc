-- Issue 25's candidates beside the crate's table (docs/BENCHMARKS.md, "The decision"), made
-- from `idempotency_keys` filled with :n live keys by candidates.sh:
--   idem_u  the key as uuid, its primary key built as the crate's is;
--   idem_p  partitioned by expires_at, 26 hourly partitions, an index on (scope, key) in each;
--   idem_s  a plain table with the same 2.4 M rows as idem_p, to compare lookups with.
SET maintenance_work_mem = '1GB';
SET client_min_messages = warning;
DROP TABLE IF EXISTS idem_u, idem_p, idem_s;
CREATE TABLE idem_u (LIKE idempotency_keys INCLUDING DEFAULTS);
ALTER TABLE idem_u ALTER COLUMN key TYPE uuid USING key::uuid;
INSERT INTO idem_u SELECT scope, key::uuid, fingerprint_version, fingerprint, status, headers,
    body, created_at, expires_at, request_id, traceparent, body_omitted FROM idempotency_keys;
ALTER TABLE idem_u ADD CONSTRAINT idem_u_pkey PRIMARY KEY (scope, key) WITH (fillfactor = 70);
ALTER INDEX idem_u_pkey RESET (fillfactor);
CREATE INDEX idem_u_expires_at_idx ON idem_u (expires_at);
CREATE TABLE idem_s (LIKE idempotency_keys INCLUDING DEFAULTS);
CREATE TABLE idem_p (LIKE idempotency_keys INCLUDING DEFAULTS) PARTITION BY RANGE (expires_at);
DO $$
BEGIN
    FOR h IN 0..25 LOOP
        EXECUTE format('CREATE TABLE idem_p_%s PARTITION OF idem_p FOR VALUES FROM (%L) TO (%L)',
            h, date_trunc('hour', now()) + (h - 1) * interval '1 hour',
            date_trunc('hour', now()) + h * interval '1 hour');
    END LOOP;
END $$;
INSERT INTO idem_s SELECT scope, key, fingerprint_version, fingerprint, status, headers, body,
    created_at, now() + random() * interval '24 hours', request_id, traceparent, body_omitted
FROM idempotency_keys LIMIT 2400000;
INSERT INTO idem_p SELECT * FROM idem_s;
ALTER TABLE idem_s ADD PRIMARY KEY (scope, key);
CREATE INDEX ON idem_p (scope, key);
VACUUM ANALYZE idem_u;
VACUUM ANALYZE idem_s;
VACUUM ANALYZE idem_p;
