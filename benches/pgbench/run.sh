#!/usr/bin/env bash
# Statement-level costs of a first request, with pgbench (docs/BENCHMARKS.md, "Where the
# time goes"). Each script adds one of the crate's statements to the bare
# `BEGIN; INSERT; COMMIT`; `first_request` is the whole first request as the crate sends
# it, and `zero2prod` the hand-written shape of benches/throughput/paths.rs. Every script runs with
# prepare.sql in front of it.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/scratch bash benches/pgbench/run.sh [seconds [script...]]
#
# Without script names it runs bare, lock, lookup, insert, first_request and zero2prod;
# `bare claim claim_fused claim_narrow` compares the claim with issue 14's candidates.
#
# DATABASE_URL must name a database the script may fill: it applies the crate's
# migrations there and creates a `payments` table. Server CPU per transaction is read from
# /proc/stat (everything but pgbench), so it is right only for a server on this machine
# that serves nothing else meanwhile.
set -euo pipefail
: "${DATABASE_URL:?set DATABASE_URL to a scratch database (see the header of this script)}"
secs=${1:-6}
shift || true
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=(bare lock lookup insert first_request zero2prod)
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
cargo run --quiet --features cli --bin pg-idempotency -- migrate >/dev/null
psql -q "$DATABASE_URL" \
    -c "CREATE TABLE IF NOT EXISTS payments (id bigserial PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL)" \
    -c "CREATE TABLE IF NOT EXISTS idem_z2p (LIKE idempotency_keys INCLUDING DEFAULTS INCLUDING INDEXES)" \
    -c "ALTER TABLE idem_z2p ALTER status DROP NOT NULL, ALTER headers DROP NOT NULL, ALTER body DROP NOT NULL"
hz=$(getconf CLK_TCK)
busy() { awk '/^cpu / {print $2+$3+$4+$7+$8}' /proc/stat; }
printf '%-22s %8s %14s %18s\n' script tps ratio_to_bare 'server_cpu_us/tx'
bare_tps=
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for script in "${scripts[@]}"; do
    cat "$here/prepare.sql" "$here/$script.sql" >"$scratch/$script.sql"
    psql -q "$DATABASE_URL" -c "TRUNCATE idempotency_keys, idem_z2p, payments" -c CHECKPOINT
    b0=$(busy)
    out=$( { /usr/bin/time -f "TIME %U %S" env PGSSLMODE=disable \
        pgbench -n -D prepared=0 -c 16 -j 2 -T "$secs" -f "$scratch/$script.sql" "$DATABASE_URL"; } 2>&1 )
    b1=$(busy)
    tx=$(awk '/number of transactions actually processed/ {print $NF}' <<<"$out")
    tps=$(awk '/^tps/ {printf "%d", $3}' <<<"$out")
    own=$(awk '/^TIME/ {print $2 + $3}' <<<"$out")
    bare_tps=${bare_tps:-$tps}
    awk -v s="$script" -v tps="$tps" -v bare="$bare_tps" -v b=$((b1 - b0)) -v hz="$hz" \
        -v own="$own" -v tx="$tx" \
        'BEGIN { printf "%-22s %8d %14.2f %18.0f\n", s, tps, tps / bare, (b / hz - own) * 1e6 / tx }'
done
