#!/usr/bin/env bash
# Dependency direction: the pure core (flowgrid-model, flowgrid-engine) must not depend,
# even transitively, on a runtime, the broker client or a store backend. Those belong to
# the shell crates (coordinator, sdk, store adapters).
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$(repo_root)"

CARGO=${CARGO:-cargo}
CORE_CRATES=(flowgrid-model flowgrid-engine)
FORBIDDEN=(tokio async-nats redb foundationdb foundationdb-sys)

failed=0
for crate in "${CORE_CRATES[@]}"; do
    say "check-deps: $CARGO tree -p $crate -e normal"
    tree=$("$CARGO" tree -p "$crate" -e normal --prefix none --format '{p}') \
        || die "cargo tree -p $crate failed"
    for forbidden in "${FORBIDDEN[@]}"; do
        # Each line is "<name> v<version> [(<source>)]".
        if grep -q "^$forbidden v" <<<"$tree"; then
            say "check-deps: FAIL: $crate depends on $forbidden (the core must stay free of runtimes, brokers and stores):"
            "$CARGO" tree -p "$crate" -e normal -i "$forbidden" >&2 || true
            failed=1
        fi
    done
done
((failed == 0)) || die "dependency direction check failed"
say "check-deps: ok (${CORE_CRATES[*]} are free of ${FORBIDDEN[*]})"
