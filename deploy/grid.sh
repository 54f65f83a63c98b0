#!/usr/bin/env bash
# A local grid in the background, for make up / down / status:
#   nats-server (JetStream, store .grid/nats) on 127.0.0.1:$NATS_PORT,
#   one coordinator (data dir .grid/data, metrics on 127.0.0.1:$METRICS_PORT),
#   one demo worker process serving the pools $WORKER_POOLS.
# Pid files and logs live in .grid/. `down` stops only what `up` started (by pid file)
# and is safe to run twice.
#
# usage: deploy/grid.sh up|down|status|clean
# env:   NATS_PORT (4222) METRICS_PORT (9464) SHARDS (256) WORKER_POOLS (gpu-llm,cpu-media)
#        FLOWGRID_BIN (target/debug/flowgrid) GRID_DIR (.grid) UP_TIMEOUT_SECONDS (60)
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

NATS_PORT=${NATS_PORT:-4222}
METRICS_PORT=${METRICS_PORT:-9464}
SHARDS=${SHARDS:-256}
WORKER_POOLS=${WORKER_POOLS:-gpu-llm,cpu-media}
FLOWGRID_BIN=${FLOWGRID_BIN:-target/debug/flowgrid}
GRID_DIR=${GRID_DIR:-.grid}
UP_TIMEOUT_SECONDS=${UP_TIMEOUT_SECONDS:-60}
NATS_URL=nats://127.0.0.1:$NATS_PORT
# Stop order: workers first (they hold tasks), then the coordinator, then the broker.
COMPONENTS=(worker coordinator nats)

pid_file() {
    printf '%s/%s.pid' "$GRID_DIR" "$1"
}

# The live pid of component $1 from its pid file, or nothing. A pid file whose process is
# gone, or was reused by a program that is not ours, is stale and removed.
live_pid() {
    local file pid cmdline
    file=$(pid_file "$1")
    [[ -f "$file" ]] || return 0
    pid=$(<"$file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid"; then
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        if [[ "$cmdline" == *nats-server* || "$cmdline" == *flowgrid* ]]; then
            printf '%s' "$pid"
            return 0
        fi
    fi
    rm -f "$file"
}

flowgrid() {
    "$FLOWGRID_BIN" --nats-url "$NATS_URL" "$@"
}

up() {
    local component running=()
    for component in "${COMPONENTS[@]}"; do
        if [[ -n "$(live_pid "$component")" ]]; then
            running+=("$component")
        fi
    done
    if ((${#running[@]} == ${#COMPONENTS[@]})); then
        say "grid is already up (${running[*]}); 'make down' stops it"
        return 0
    fi
    if ((${#running[@]} > 0)); then
        die "a partial grid is running (${running[*]}): run 'make down' first"
    fi
    [[ -x "$FLOWGRID_BIN" ]] || die "$FLOWGRID_BIN not found: run 'make build'"
    load_tools "$ROOT"
    port_open "$NATS_PORT" && die "127.0.0.1:$NATS_PORT is in use by another program: stop it or use NATS_PORT=..."
    mkdir -p "$GRID_DIR/nats" "$GRID_DIR/data"

    say "starting nats-server on 127.0.0.1:$NATS_PORT (store $GRID_DIR/nats, log $GRID_DIR/nats.log)"
    start_bg "$GRID_DIR/nats.log" "$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$GRID_DIR/nats"
    echo "$STARTED_PID" >"$(pid_file nats)"
    WATCH_PIDS="$STARTED_PID" wait_until 15 "nats-server on port $NATS_PORT" port_open "$NATS_PORT" \
        || fail_up

    say "starting coordinator (data $GRID_DIR/data, metrics http://127.0.0.1:$METRICS_PORT/metrics, log $GRID_DIR/coordinator.log)"
    start_bg "$GRID_DIR/coordinator.log" "$FLOWGRID_BIN" coordinator --nats-url "$NATS_URL" \
        --data-dir "$GRID_DIR/data" --shards "$SHARDS" --metrics-addr "127.0.0.1:$METRICS_PORT"
    echo "$STARTED_PID" >"$(pid_file coordinator)"
    local coordinator_pid=$STARTED_PID

    say "starting demo workers for $WORKER_POOLS (log $GRID_DIR/worker.log)"
    start_bg "$GRID_DIR/worker.log" "$FLOWGRID_BIN" --nats-url "$NATS_URL" worker --pools "$WORKER_POOLS"
    echo "$STARTED_PID" >"$(pid_file worker)"

    say "waiting for the coordinator to answer (up to ${UP_TIMEOUT_SECONDS}s)"
    WATCH_PIDS="$coordinator_pid" wait_until "$UP_TIMEOUT_SECONDS" "the coordinator to answer 'flowgrid flow list'" \
        flowgrid flow list || fail_up

    cat <<USAGE
flowgrid is up: NATS $NATS_URL, metrics http://127.0.0.1:$METRICS_PORT/metrics, logs in $GRID_DIR/

  $FLOWGRID_BIN flow deploy deploy/flows/media-pipeline.yaml
  $FLOWGRID_BIN run start media-pipeline --input '{"video": "talk.mp4", "segments": [{"index": 0}], "language_hint": "auto"}' --wait
  $FLOWGRID_BIN run list
  make status        # processes and deployed flows
  make down          # stop the grid (data stays in $GRID_DIR/data; make clean-grid removes it)
USAGE
    if [[ "$NATS_PORT" != 4222 ]]; then
        echo "(NATS is not on the default port: pass --nats-url $NATS_URL to flowgrid.)"
    fi
}

fail_up() {
    print_log_tails "$GRID_DIR/nats.log" "$GRID_DIR/coordinator.log" "$GRID_DIR/worker.log"
    down
    die "the grid did not come up (logs above)"
}

down() {
    local component pid stopped=0
    for component in "${COMPONENTS[@]}"; do
        pid=$(live_pid "$component")
        if [[ -n "$pid" ]]; then
            stop_pid "$pid" "$component"
            stopped=$((stopped + 1))
        fi
        rm -f "$(pid_file "$component")"
    done
    if ((stopped == 0)); then
        say "grid is not running"
    else
        say "grid stopped"
    fi
}

status() {
    local component pid
    for component in "${COMPONENTS[@]}"; do
        pid=$(live_pid "$component")
        if [[ -n "$pid" ]]; then
            printf '%-12s running  pid %s\n' "$component" "$pid"
        else
            printf '%-12s stopped\n' "$component"
        fi
    done
    if [[ -n "$(live_pid coordinator)" ]]; then
        printf '\nflows:\n'
        flowgrid flow list
    fi
}

# Removes the grid's state (store and broker data); refuses while the grid runs.
clean() {
    local component
    for component in "${COMPONENTS[@]}"; do
        [[ -z "$(live_pid "$component")" ]] || die "the grid is running ($component): run 'make down' first"
    done
    say "removing $GRID_DIR/data and $GRID_DIR/nats"
    rm -rf "$GRID_DIR/data" "$GRID_DIR/nats"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    clean) clean ;;
    *) die "usage: $0 up|down|status|clean" ;;
esac
