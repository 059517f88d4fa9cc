#!/usr/bin/env bash
# Issue 25's candidates beside the crate's table, with pgbench (docs/BENCHMARKS.md, "The
# decision"): a first request on idempotency_keys against the same on a copy keyed by
# uuid, then the claim's lookup on 26 hourly partitions against one table.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/scratch N=50000000 \
#       bash benches/pgbench/candidates/run.sh [seconds [pairs]]
#
# DATABASE_URL names a scratch database the script fills: the crate's migrations, N live
# keys (default 50,000,000, about 22 GB, and as much again for the uuid copy) shaped as
# benches/throughput/table.rs fills them, and the candidates' tables (setup.sql). Then
# `pairs` (default 4) alternating runs of `seconds` (default 20) each, 16 clients.
set -euo pipefail
: "${DATABASE_URL:?set DATABASE_URL to a scratch database (see the header of this script)}"
n=${N:-50000000}
secs=${1:-20}
pairs=${2:-4}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../.."
cargo run --quiet --features cli --bin pg-idempotency -- migrate >/dev/null
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" <<SQL
CREATE TABLE IF NOT EXISTS payments (id bigserial PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL);
SET maintenance_work_mem = '1GB';
BEGIN;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
DROP INDEX idempotency_keys_expires_at_idx;
INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, headers,
    body, created_at, expires_at, request_id)
SELECT 'acct_' || (g % 1000), gen_random_uuid()::text, 1, sha256(int8send(g)), 201,
       '[["content-type","application/json"]]',
       convert_to('{"id":"pay_' || lpad(g::text, 12, '0') || '","status":"succeeded","amount":1000,"currency":"eur","created":"2026-12-06T12:00:00Z"}', 'UTF8'),
       created, created + interval '24 hours', 'req_' || upper(substr(md5(g::text), 1, 26))
FROM (SELECT g, now() - random() * interval '23 hours' AS created
      FROM generate_series((SELECT count(*) FROM idempotency_keys) + 1, $n) AS g) AS day;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (scope, key) WITH (fillfactor = 70);
ALTER INDEX idempotency_keys_pkey RESET (fillfactor);
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
COMMIT;
VACUUM ANALYZE idempotency_keys;
SQL
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -f "$here/setup.sql"
psql -q "$DATABASE_URL" -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" \
    -c "SELECT pg_prewarm('idempotency_keys_pkey'), pg_prewarm('idem_u_pkey')" >/dev/null || true
psql -q "$DATABASE_URL" -c CHECKPOINT
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cat benches/pgbench/prepare.sql "$here/first_text.sql" >"$scratch/first_text.sql"
lsn() { psql -qAt "$DATABASE_URL" -c "SELECT pg_current_wal_lsn()"; }
run() { # label script [pgbench options]
    local label=$1 script=$2 w0 w1 out tx
    shift 2
    w0=$(lsn)
    out=$(PGSSLMODE=disable pgbench -n -D prepared=0 "$@" -c 16 -j 2 -T "$secs" -f "$script" "$DATABASE_URL" 2>&1)
    w1=$(lsn)
    tx=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out")
    printf '%-24s %8s tps %8s B WAL/tx\n' "$label" "$(awk '/^tps/ {printf "%d", $3}' <<<"$out")" \
        "$(psql -qAt "$DATABASE_URL" -c "SELECT (pg_wal_lsn_diff('$w1', '$w0') / greatest($tx, 1))::int")"
}
for _ in $(seq "$pairs"); do
    run "first request, text key" "$scratch/first_text.sql"
    run "first request, uuid key" "$here/first_uuid.sql"
done
for _ in $(seq "$pairs"); do
    run "lookup, one table" "$here/lookup.sql" -D table=idem_s
    run "lookup, 26 partitions" "$here/lookup.sql" -D table=idem_p
done
