#!/usr/bin/env bash
# The anyonce conformance suite (tests/conformance/anyonce/: vectors and runner copied
# unmodified from the peer project, see its NOTICE.md) against examples/conformance.rs:
# this crate's layer on a whole router, as a user writes it.
#
#   bash .ci/conformance.sh [SUITE_DIR]   # default: the copy in tests/conformance/anyonce
#
# - in the IETF dialect (`--dialect ietf`) every vector must pass: 20/20;
# - in the default dialect (the error specification in ../shared/seeds/) every failure must
#   be one of the departures of dialect docs/POLICY.md lists (409 instead of 422 for a changed
#   payload, `Idempotent-Replayed` instead of `Idempotency-Replayed`, snake_case codes);
#   a failure of behaviour fails this script.
#
# Needs Node.js 18+ and npm (the runner is TypeScript, run with tsx from the npm
# registry, installed once under the cache directory). The example takes DATABASE_URL
# when it is set, else a throwaway database.
set -euo pipefail
cd "$(dirname "$0")/.."

suite=${1:-tests/conformance/anyonce}
[ -f "$suite/packages/conformance/src/cli.ts" ] || {
    echo "no conformance suite at $suite (pass its directory as the first argument)" >&2
    exit 1
}
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "== installing Node.js and npm"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
TSX_VERSION=4.23.15
tools="${XDG_CACHE_HOME:-$HOME/.cache}/pg-idempotency/anyonce-tools"
if [ ! -x "$tools/node_modules/.bin/tsx" ] ||
    ! grep -q "\"version\": \"$TSX_VERSION\"" "$tools/node_modules/tsx/package.json"; then
    npm install --silent --no-audit --no-fund --prefix "$tools" "tsx@$TSX_VERSION" >/dev/null
fi

cargo build --quiet --example conformance
example=target/debug/examples/conformance
work=$(mktemp -d)
server=
stop_server() {
    if [ -n "$server" ]; then
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=
    fi
}
trap 'stop_server; rm -rf "$work"' EXIT

# Runs the suite against the example in dialect $1; the JSON report goes to $work/$1.json.
run_suite() {
    local dialect=$1 url=
    "$example" --port 0 --dialect "$dialect" >"$work/$dialect.out" 2>"$work/$dialect.err" &
    server=$!
    for _ in $(seq 1 600); do
        url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$work/$dialect.out" || true)
        [ -n "$url" ] && break
        kill -0 "$server" 2>/dev/null || { cat "$work/$dialect.err" >&2; return 1; }
        sleep 0.1
    done
    [ -n "$url" ] || { echo "the example did not start in 60 s" >&2; return 1; }
    "$tools/node_modules/.bin/tsx" "$suite/packages/conformance/src/cli.ts" --url "$url" \
        --tier core --tier profile --capability short-ttl --ttl-ms 2000 \
        --report json --out "$work/$dialect.json" >/dev/null || true
    stop_server
}

# Prints the report's table and checks it: every vector passes, or (with `departures`)
# every failure is one of the listed departures of dialect.
check() {
    node - "$1" "$2" <<'JS'
const [report, mode] = process.argv.slice(2);
const { results, passed, failed, errored } = JSON.parse(require("fs").readFileSync(report, "utf8"));
const departures = [
  /^status: expected 422, got 409$/,
  /^header Idempotency-Replayed: expected "true", got absent$/,
  /^header Idempotency-Replay: expected "omitted", got absent$/,
  /^body\.code: expected "invalid-key", got "idempotency_key_invalid"$/,
  /^body\.code: expected "missing-key", got "idempotency_key_missing"$/,
  /^body\.code: expected "fingerprint-mismatch", got "idempotency_conflict"$/,
];
let bad = errored;
for (const r of results) {
  const failures = r.steps.flatMap((s) => s.failures.map((f) => `${s.stepId}: ${f}`));
  const unexplained = failures.filter((f) => !departures.some((d) => d.test(f.replace(/^[^:]*: /, ""))));
  if (r.status === "errored" || (mode === "all" ? failures.length : unexplained.length)) bad += 1;
  console.log(`  ${r.status.padEnd(5)} ${r.id}${failures.length ? "  (" + failures.join("; ") + ")" : ""}`);
}
console.log(`  ${passed} passed, ${failed} failed, ${errored} errored`);
if (bad) {
  console.error(mode === "all" ? "  not every vector passed" : "  a failure above is not a departure of dialect");
  process.exit(1);
}
JS
}

echo "-- IETF dialect (every vector must pass)"
run_suite ietf
check "$work/ietf.json" all
echo "-- default dialect (failures must be departures of dialect only)"
run_suite seed
check "$work/seed.json" departures
