#!/usr/bin/env bash
# Type-checks the FoundationDB store backend and its cluster tests, and runs the store
# contract suite against a cluster when FDB_CLUSTER_FILE is set. Its bindings are
# generated with bindgen, which needs libclang (Debian: libclang-dev). The type-check links
# nothing, so it needs no FoundationDB client library; running the contract suite does:
# it links libfdb_c (7.3 or later: the backend uses API version 730), from the linker's
# search path or FDB_CLIENT_LIB_PATH, and needs a running cluster named by FDB_CLUSTER_FILE.
#   --skip-if-missing   without libclang, print a loud notice and exit 0 (used by make test)
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

CARGO=${CARGO:-cargo}

# True when the FoundationDB client library can be linked: in the dynamic linker's cache,
# or in FDB_CLIENT_LIB_PATH (which the foundationdb-sys build adds to the link search path).
have_libfdb_c() {
    if [[ -n "${FDB_CLIENT_LIB_PATH:-}" ]] && compgen -G "$FDB_CLIENT_LIB_PATH/libfdb_c.so*" >/dev/null; then
        return 0
    fi
    local ldconfig
    ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
    [[ -x "$ldconfig" ]] && "$ldconfig" -p 2>/dev/null | grep -q 'libfdb_c\.so'
}

if ! have_libclang; then
    if [[ "${1:-}" == --skip-if-missing ]]; then
        say ""
        say "################################################################################"
        say "## SKIPPED: cargo check of flowgrid-store-fdb (cluster tests) and flowgrid-cli --features fdb"
        say "## reason: libclang-dev is not installed and could not be installed here"
        say "##         (make setup installs it when run as root with apt-get)."
        say "## The FoundationDB backend was NOT type-checked."
        say "################################################################################"
        say ""
        exit 0
    fi
    die "libclang is missing: install libclang-dev (sudo apt-get install libclang-dev, or make setup as root)"
fi
# The backend with its cluster tests, and the coordinator's --fdb-cluster-file (built in
# with flowgrid-cli's `fdb` feature), in one invocation: two would check the dependencies
# they share twice, under different feature sets.
say "check-fdb: $CARGO check -p flowgrid-store-fdb -p flowgrid-cli --tests --features flowgrid-store-fdb/cluster-tests,flowgrid-cli/fdb"
"$CARGO" check -p flowgrid-store-fdb -p flowgrid-cli --tests --features flowgrid-store-fdb/cluster-tests,flowgrid-cli/fdb

# The store contract suite needs a running FoundationDB cluster and its client library.
# Built with --features cluster-tests, the suite fails (never passes) without a cluster
# file, so it is only run when FDB_CLUSTER_FILE is set.
if [[ -n "${FDB_CLUSTER_FILE:-}" ]]; then
    [[ -r "$FDB_CLUSTER_FILE" ]] || die "FDB_CLUSTER_FILE=$FDB_CLUSTER_FILE is not a readable file: point it at the cluster file of a running cluster"
    if ! have_libfdb_c; then
        die "libfdb_c is not installed, so the FoundationDB contract suite cannot link: install the FoundationDB 7.3 client package (foundationdb-clients), or set FDB_CLIENT_LIB_PATH to the directory holding libfdb_c.so"
    fi
    if [[ -n "${FDB_CLIENT_LIB_PATH:-}" ]]; then
        # The test binary loads libfdb_c from there too.
        export LD_LIBRARY_PATH="$FDB_CLIENT_LIB_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    say "check-fdb: FDB_CLUSTER_FILE=$FDB_CLUSTER_FILE: running the store contract suite against the cluster"
    "$CARGO" test -p flowgrid-store-fdb --features cluster-tests
else
    say ""
    say "################################################################################"
    say "## NOT RUN: the store contract suite against FoundationDB."
    say "## reason: FDB_CLUSTER_FILE is not set. The backend was type-checked only."
    say "## To run it (needs a running cluster and libfdb_c 7.3 installed):"
    say "##   FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster make check-fdb"
    say "################################################################################"
    say ""
fi
