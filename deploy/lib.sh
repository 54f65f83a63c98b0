# Shared shell helpers of the deploy scripts. Source it; it defines functions only.
# shellcheck shell=bash

# Diagnostics go to stderr; stdout is for data.
say() {
    printf '%s\n' "$*" >&2
}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Repository root (the parent of deploy/).
repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# A TCP port that was free a moment ago on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True when process $1 is alive.
alive() {
    kill -0 "$1" 2>/dev/null
}

# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 0.2 s until it succeeds, or fails
# after SECONDS with a message naming WHAT. Each process id listed in WATCH_PIDS (optional,
# space-separated) must stay alive meanwhile: a dead one fails at once, also when COMMAND
# succeeded (another program may answer it, e.g. one that holds the port probed).
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds)) pid answered
    while :; do
        answered=
        if "$@" >/dev/null 2>&1; then
            answered=yes
        fi
        for pid in ${WATCH_PIDS:-}; do
            alive "$pid" || { say "process $pid exited while waiting for $what"; return 1; }
        done
        [[ -z "$answered" ]] || return 0
        if ((SECONDS >= deadline)); then
            say "timed out after ${seconds}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# stop_pid PID NAME [SECONDS]: SIGTERM, wait up to SECONDS (10), then SIGKILL. Quiet when
# already gone.
stop_pid() {
    local pid=$1 name=$2 seconds=${3:-10}
    alive "$pid" || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    wait_gone "$seconds" "$pid" || true
    if alive "$pid"; then
        say "$name (pid $pid) ignored SIGTERM for ${seconds}s; killing it (kill -9)"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # Reap it when it is our child; harmless otherwise.
    wait "$pid" 2>/dev/null || true
}

# stop_pids SECONDS "PID NAME"...: SIGTERM to all at once, wait up to SECONDS for all of
# them, then SIGKILL those still alive. For processes that stop in parallel.
stop_pids() {
    local seconds=$1 entry pid name pids=()
    shift
    for entry in "$@"; do
        read -r pid name <<<"$entry"
        alive "$pid" || continue
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    ((${#pids[@]} > 0)) || return 0
    wait_gone "$seconds" "${pids[@]}" || true
    for entry in "$@"; do
        read -r pid name <<<"$entry"
        if alive "$pid"; then
            say "$name (pid $pid) did not stop within ${seconds}s of SIGTERM; killing it (kill -9)"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
}

# wait_gone SECONDS PID...: true once every PID has exited, false after SECONDS.
wait_gone() {
    local deadline=$((SECONDS + $1)) pid
    shift
    for pid in "$@"; do
        while alive "$pid"; do
            ((SECONDS < deadline)) || return 1
            sleep 0.2
        done
    done
}

# Loads .grid/tools.env written by deploy/setup.sh (NATS_SERVER_BIN, GRID_PYTHON) unless
# the caller already set NATS_SERVER_BIN.
load_tools() {
    local root=$1
    if [[ -z "${NATS_SERVER_BIN:-}" && -f "$root/.grid/tools.env" ]]; then
        # Read, not sourced: a value is taken as written, spaces in a path included.
        local key value
        while IFS='=' read -r key value; do
            case $key in
                NATS_SERVER_BIN | GRID_PYTHON) export "$key=$value" ;;
            esac
        done <"$root/.grid/tools.env"
    fi
    if [[ -z "${NATS_SERVER_BIN:-}" ]]; then
        NATS_SERVER_BIN=$(command -v nats-server || true)
    fi
    [[ -n "${NATS_SERVER_BIN:-}" && -x "$NATS_SERVER_BIN" ]] \
        || die "nats-server not found: run 'make setup' (or set NATS_SERVER_BIN)"
    export NATS_SERVER_BIN
}

# True when libclang (and its headers, from libclang-dev) is available to bindgen, which
# the FoundationDB bindings need at build time.
have_libclang() {
    if [[ -n "${LIBCLANG_PATH:-}" ]]; then
        compgen -G "$LIBCLANG_PATH/libclang*.so*" >/dev/null && return 0
    fi
    if command -v dpkg-query >/dev/null 2>&1; then
        dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'install ok installed'
        return
    fi
    compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null \
        || compgen -G "/usr/lib*/libclang.so" >/dev/null \
        || compgen -G "/usr/lib/*/libclang.so" >/dev/null
}

# start_bg LOG COMMAND...: starts COMMAND in the background with its output in LOG and
# sets STARTED_PID. nohup keeps it alive when the starting terminal goes away.
start_bg() {
    local log=$1
    shift
    nohup "$@" >"$log" 2>&1 </dev/null &
    # shellcheck disable=SC2034 # read by the callers
    STARTED_PID=$!
}

# print_log_tails FILE...: the last lines of each log, for failure reports.
print_log_tails() {
    local log
    for log in "$@"; do
        [[ -f "$log" ]] || continue
        say "---- last 40 lines of $log ----"
        tail -n 40 "$log" >&2 || true
    done
}
