#!/usr/bin/env bash
# The demo, from a fresh clone: installs what is missing, builds, starts a throw-away grid
# (nats-server with JetStream, one coordinator, demo workers for gpu-llm and cpu-media) on
# free ports with temporary directories, deploys deploy/flows/media-pipeline.yaml, runs it
# and prints the result with per-step timings. Everything it started is stopped on exit;
# the exit status is the run's (0 when it succeeded).
#
# env: CARGO (cargo) DEMO_TIMEOUT (120s) SKIP_SETUP=1 (do not run deploy/setup.sh)
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

CARGO=${CARGO:-cargo}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-120s}
FLOW_FILE=deploy/flows/media-pipeline.yaml
INPUT='{
  "video": "talk.mp4",
  "language_hint": "auto",
  "segments": [
    {"index": 0, "start_s": 0,   "end_s": 30},
    {"index": 1, "start_s": 30,  "end_s": 60},
    {"index": 2, "start_s": 60,  "end_s": 90},
    {"index": 3, "start_s": 90,  "end_s": 120},
    {"index": 4, "start_s": 120, "end_s": 150},
    {"index": 5, "start_s": 150, "end_s": 180},
    {"index": 6, "start_s": 180, "end_s": 210},
    {"index": 7, "start_s": 210, "end_s": 240}
  ]
}'

if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
    say "demo: installing what is missing (deploy/setup.sh)"
    SETUP_SKIP_SYSTEM=1 ./deploy/setup.sh
fi
load_tools "$ROOT"

say "demo: building ($CARGO build --bins)"
"$CARGO" build --bins
TARGET_DIR=$("$CARGO" metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
FLOWGRID_BIN=$TARGET_DIR/debug/flowgrid
[[ -x "$FLOWGRID_BIN" ]] || die "the build did not produce $FLOWGRID_BIN"

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/flowgrid-demo.XXXXXX")
LOGS=("$WORK_DIR/nats.log" "$WORK_DIR/coordinator.log" "$WORK_DIR/worker-gpu-llm.log" "$WORK_DIR/worker-cpu-media.log")
STARTED=() # "pid name" of every process we started, in start order

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local status=$? index pid name
    trap - EXIT INT TERM HUP
    # Output may go to a closed pipe by now; stopping the processes matters more than
    # reporting it.
    trap '' PIPE
    # Stop in reverse start order: workers, coordinator, then the broker.
    for ((index = ${#STARTED[@]} - 1; index >= 0; index--)); do
        read -r pid name <<<"${STARTED[index]}"
        stop_pid "$pid" "$name"
    done
    if ((status != 0)); then
        print_log_tails "${LOGS[@]}"
        say "demo: FAILED (status $status); logs kept in $WORK_DIR"
    else
        rm -rf "$WORK_DIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

started() {
    STARTED+=("$STARTED_PID $1")
}

NATS_PORT=$(free_port)
METRICS_PORT=$(free_port)
NATS_URL=nats://127.0.0.1:$NATS_PORT
export FLOWGRID_NATS_URL=$NATS_URL

flowgrid() {
    "$FLOWGRID_BIN" --nats-url "$NATS_URL" "$@"
}

say "demo: starting nats-server on 127.0.0.1:$NATS_PORT"
start_bg "$WORK_DIR/nats.log" "$NATS_SERVER_BIN" -c "$ROOT/deploy/nats-server.conf" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK_DIR/nats"
started nats-server
WATCH_PIDS=$STARTED_PID wait_until 15 "nats-server on port $NATS_PORT" port_open "$NATS_PORT"

say "demo: starting coordinator (metrics on http://127.0.0.1:$METRICS_PORT/metrics)"
start_bg "$WORK_DIR/coordinator.log" "$FLOWGRID_BIN" coordinator --nats-url "$NATS_URL" \
    --data-dir "$WORK_DIR/data" --metrics-addr "127.0.0.1:$METRICS_PORT"
started coordinator
COORDINATOR_PID=$STARTED_PID

for pool in gpu-llm cpu-media; do
    say "demo: starting demo worker for pool $pool"
    start_bg "$WORK_DIR/worker-$pool.log" "$FLOWGRID_BIN" --nats-url "$NATS_URL" worker --pools "$pool"
    started "worker-$pool"
done

say "demo: waiting for the coordinator to answer"
WATCH_PIDS=$COORDINATOR_PID wait_until 60 "the coordinator to answer 'flowgrid flow list'" flowgrid flow list

say "demo: deploying $FLOW_FILE"
flowgrid flow deploy "$FLOW_FILE" >&2

say "demo: running media-pipeline (waiting up to $DEMO_TIMEOUT); the model's summary, word by word as it is written:"
run_status=0
RUN_ID=$(flowgrid run start media-pipeline --input "$INPUT")
flowgrid run tail "$RUN_ID" --step summarize_en --timeout "$DEMO_TIMEOUT" || run_status=$?
say "demo: the run, step by step"
flowgrid run get "$RUN_ID" || run_status=$?
if ((run_status == 0)); then
    say "demo: the run succeeded; running it again: its summary now comes from the task cache"
    flowgrid run start media-pipeline --input "$INPUT" --wait --timeout "$DEMO_TIMEOUT" || run_status=$?
fi
if ((run_status == 0)); then
    say "demo: to watch runs go by in a web UI, keep a grid up: make up, then open http://127.0.0.1:8480/"
else
    say "demo: the run did not succeed (flowgrid exited with $run_status)"
fi
exit "$run_status"
