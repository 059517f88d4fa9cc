#!/usr/bin/env bash
# A library must build wherever its users build: builds .ci/downstream (a crate that
# depends on pg-idempotency with every feature) outside this repository, with
# DATABASE_URL naming an empty database (from the environment, then from a .env file)
# and with none at all. Then, as a control that this check can fail, points the crate's
# own variable (sqlx.toml: PG_IDEMPOTENCY_DATABASE_URL) at the empty database, where
# the `query!` macros must fail.
#
#   bash .ci/downstream.sh SERVER_URL    # a PostgreSQL URL on which databases can be created
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
server=${1:?usage: .ci/downstream.sh SERVER_URL}
# Nothing of this repository's build settings may reach the user's build.
unset SQLX_OFFLINE SQLX_OFFLINE_DIR PG_IDEMPOTENCY_DATABASE_URL DATABASE_URL

work=$(mktemp -d)
empty="pgidem_downstream_$$"
cleanup() {
    psql -q "$server" -c "DROP DATABASE IF EXISTS $empty" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
psql -q "$server" -c "CREATE DATABASE $empty"
empty_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$server" "$empty")

cp -r "$repo/.ci/downstream/." "$work/"
sed -i "s|@REPO@|$repo|" "$work/Cargo.toml"
export CARGO_TARGET_DIR="$work/target"
build() {
    # The dependency's macros run again only when it is rebuilt.
    (cd "$work" && cargo clean --quiet -p pg-idempotency 2>/dev/null || true)
    (cd "$work" && "$@" cargo build --quiet)
}

echo "-- DATABASE_URL names an empty database"
build env DATABASE_URL="$empty_url"
echo "-- a .env file names it"
echo "DATABASE_URL=$empty_url" >"$work/.env"
build env
rm "$work/.env"
echo "-- no DATABASE_URL"
build env
echo "-- control: PG_IDEMPOTENCY_DATABASE_URL at the empty database must fail"
if log=$(build env PG_IDEMPOTENCY_DATABASE_URL="$empty_url" 2>&1); then
    echo "the build succeeded: the macros did not check against the database, so the checks above prove nothing" >&2
    exit 1
fi
grep -q 'relation "idempotency_keys" does not exist' <<<"$log" || {
    echo "the control failed for another reason:" >&2
    echo "$log" >&2
    exit 1
}
echo "downstream builds: ok"
