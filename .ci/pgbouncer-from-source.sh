#!/usr/bin/env bash
# Builds PgBouncer from its source and installs the binary into PREFIX/bin, for the pooler
# tests through a PgBouncer with protocol-level prepared statements (1.21 and later,
# `max_prepared_statements`; Debian 12 ships 1.18, which has none):
#
#   bash .ci/pgbouncer-from-source.sh SOURCE PREFIX [TAG]
#   PG_IDEMPOTENCY_PGBOUNCER=PREFIX/bin/pgbouncer \
#       cargo test --all-features --test pooler
#
# SOURCE is either a git directory of https://github.com/pgbouncer/pgbouncer (a bare
# clone, or a clone's .git) or an unpacked source tree (a release tarball, a checkout with
# its submodules). From a git directory the script builds TAG, by default the newest release
# tag (pgbouncer_X_Y_Z), which must be 1.25.0 or later: older tags keep libusual in a git
# submodule, so build those from a tarball or a checkout. A source tree is built as it is,
# and TAG must then be omitted. The build runs in a temporary directory (SOURCE is only
# read), and only the binary is installed: no man pages, so pandoc is not needed. The
# script prints the installed binary's path on its last line.
#
# Build dependencies (autoconf, automake, libtool, pkg-config, make, gcc, libevent-dev,
# libssl-dev) are installed with apt-get when missing (as root on Debian/Ubuntu; elsewhere
# install them yourself). No c-ares: PgBouncer then resolves names with libevent's evdns.
#
# Not run by .ci/run: a CI machine has Debian's pgbouncer (1.18) only, and the pooler tests
# run through it there. Never commit the source or the build output. As root, choose a
# PREFIX that the tests' unprivileged user can reach (the pooler drops to PG_TEST_USER or
# nobody), e.g. /var/cache/pg-idempotency/pgbouncer-1.25.2, not under /root.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
source_dir=$1
prefix=$2
tag=${3:-}

packages=(autoconf automake libtool pkg-config make gcc libevent-dev libssl-dev)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for package in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$package")
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "missing build dependencies: ${missing[*]} (install them, or run as root)" >&2
        exit 1
    fi
    echo "== installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

build=$(mktemp -d "${TMPDIR:-/tmp}/pgbouncer-build.XXXXXX")
trap 'rm -rf "$build"' EXIT

if git --git-dir="$source_dir" rev-parse --git-dir >/dev/null 2>&1; then
    if [ -z "$tag" ]; then
        tag=$(git --git-dir="$source_dir" tag --list 'pgbouncer_*' |
            grep -E '^pgbouncer_[0-9]+_[0-9]+_[0-9]+$' | sort -V | tail -n 1)
        [ -n "$tag" ] || { echo "$source_dir has no pgbouncer_X_Y_Z tag" >&2; exit 1; }
    fi
    echo "== building $tag from $source_dir" >&2
    git --git-dir="$source_dir" archive --format=tar "$tag" | tar -x -C "$build"
    # libusual is in lib/ from 1.25.0 on; before, it and uthash are git submodules, which
    # `git archive` leaves empty.
    if [ ! -f "$build/lib/mk/std-autogen.sh" ]; then
        echo "$tag keeps libusual in a git submodule (PgBouncer before 1.25): pass an" \
            "unpacked release tarball (https://www.pgbouncer.org/downloads/) or a checkout" \
            "after \`git submodule update --init\` as SOURCE instead" >&2
        exit 1
    fi
elif [ -f "$source_dir/configure.ac" ] || [ -f "$source_dir/configure" ]; then
    [ -z "$tag" ] || { echo "TAG applies to a git directory only" >&2; exit 2; }
    echo "== building the source tree $source_dir" >&2
    cp -a "$source_dir/." "$build/"
else
    echo "$source_dir is neither a git directory nor a PgBouncer source tree" >&2
    exit 1
fi

cd "$build"
if [ ! -x configure ]; then
    ./autogen.sh >&2
fi
./configure --prefix="$prefix" --without-cares >&2
make -j"$(nproc 2>/dev/null || echo 2)" pgbouncer >&2

mkdir -p "$prefix/bin"
install -m 0755 pgbouncer "$prefix/bin/pgbouncer"
binary=$(cd "$prefix/bin" && pwd)/pgbouncer
"$binary" --version >&2
echo "$binary"
