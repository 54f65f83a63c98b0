#!/usr/bin/env bash
# A local grid in the background, for make up / scale / down / status:
#   nats-server (JetStream, store .grid/nats) on 127.0.0.1:$NATS_PORT,
#   $COORDINATORS coordinators coordinator-1..N sharing the data dir .grid/data and the
#   $SHARDS shards; coordinator-i serves metrics on 127.0.0.1:$((METRICS_PORT + i - 1)),
#   one demo worker process serving the pools $WORKER_POOLS, and the web UI
#   (flowgrid ui --actions) on http://127.0.0.1:$UI_PORT/.
# Pid files and logs live in .grid/ (coordinator-<i>.pid, coordinator-<i>.log, ...). `down`
# stops only what `up` and `scale` started (by pid file) and is safe to run twice. The grid
# runs the copy of $FLOWGRID_BIN that `up` takes (.grid/bin/flowgrid), `scale` included.
# .grid/scale-started lists the coordinators a scale-out started until a scale succeeds:
# scaling in stops those first, so going back after a failed scale-out undoes it.
#
# usage: deploy/grid.sh up|scale|down|status|clean
# env:   COORDINATORS (1; `scale` needs it given) NATS_PORT (4222) METRICS_PORT (9464) UI_PORT (8480)
#        SHARDS (64) WORKER_POOLS (gpu-llm,cpu-media,tests) FLOWGRID_BIN (target/debug/flowgrid)
#        GRID_DIR (.grid) UP_TIMEOUT_SECONDS (60) LEAVE_TIMEOUT_SECONDS (30: a coordinator's graceful leave)
#        COORDINATORS_ORIGIN (make passes $(origin COORDINATORS): `file` is the Makefile's default)
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(repo_root)
cd "$ROOT"

# A bare `scale` would mean 1 coordinator and stop all the others: it needs the number given.
COORDINATORS_GIVEN=${COORDINATORS:+yes}
[[ "${COORDINATORS_ORIGIN:-}" != file ]] || COORDINATORS_GIVEN=
COORDINATORS=${COORDINATORS:-1}
NATS_PORT=${NATS_PORT:-4222}
METRICS_PORT=${METRICS_PORT:-9464}
UI_PORT=${UI_PORT:-8480}
SHARDS=${SHARDS:-64}
WORKER_POOLS=${WORKER_POOLS:-gpu-llm,cpu-media,tests}
FLOWGRID_BIN=${FLOWGRID_BIN:-target/debug/flowgrid}
GRID_DIR=${GRID_DIR:-.grid}
UP_TIMEOUT_SECONDS=${UP_TIMEOUT_SECONDS:-60}
LEAVE_TIMEOUT_SECONDS=${LEAVE_TIMEOUT_SECONDS:-30}
NATS_URL=nats://127.0.0.1:$NATS_PORT
# Shard ownership must hold still this many polls (0.5 s apart) to count as settled: a
# coordinator that just joined takes its shards a moment after it appears.
SETTLE_POLLS=4

pid_file() {
    printf '%s/%s.pid' "$GRID_DIR" "$1"
}

# The start time of process $1 (clock ticks after boot, field 22 of /proc/<pid>/stat): it
# tells the process from a later one given the same pid. Nothing when it is gone.
start_time() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # After the command's name, which may hold spaces and parentheses: fields 3 on.
    read -r -a fields <<<"${stat##*) }"
    printf '%s' "${fields[19]:-}"
}

# Writes component $1's pid file for process $2: its pid and start time.
record_pid() {
    echo "$2 $(start_time "$2")" >"$(pid_file "$1")"
}

# The coordinators a scale-out started, one index a line, kept until a scale succeeds.
scale_started_file() {
    printf '%s/scale-started' "$GRID_DIR"
}

# Indices of the running coordinators that a scale-out started (see scale_started_file),
# highest first, one per line.
scale_started_indices() {
    local file index
    file=$(scale_started_file)
    [[ -f "$file" ]] || return 0
    while read -r index; do
        [[ "$index" =~ ^[1-9][0-9]*$ ]] || continue
        if [[ -n "$(live_pid "coordinator-$index")" ]]; then
            printf '%s\n' "$index"
        fi
    done <"$file" | sort -nru
}

# The live pid of component $1 from its pid file, or nothing. A pid file whose process is
# gone, or whose pid now belongs to another process (after a reboot), is stale and removed.
live_pid() {
    local file pid started cmdline
    file=$(pid_file "$1")
    [[ -f "$file" ]] || return 0
    read -r pid started <"$file" || true
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid"; then
        if [[ -n "${started:-}" ]]; then
            if [[ "$(start_time "$pid")" == "$started" ]]; then
                printf '%s' "$pid"
                return 0
            fi
        else
            # A pid file of an older version: the command line is all there is to go by.
            cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
            if [[ "$cmdline" == *nats-server* || "$cmdline" == *flowgrid* ]]; then
                printf '%s' "$pid"
                return 0
            fi
        fi
    fi
    rm -f "$file"
}

# Indices of the coordinators with a live pid file, ascending, one per line.
coordinator_indices() {
    local file index
    for file in "$GRID_DIR"/coordinator-*.pid; do
        [[ -f "$file" ]] || continue
        index=${file##*/coordinator-}
        index=${index%.pid}
        [[ "$index" =~ ^[0-9]+$ ]] || continue
        if [[ -n "$(live_pid "coordinator-$index")" ]]; then
            printf '%s\n' "$index"
        fi
    done | sort -n
}

coordinator_log() {
    printf '%s/coordinator-%s.log' "$GRID_DIR" "$1"
}

metrics_port() {
    printf '%s' $((METRICS_PORT + $1 - 1))
}

flowgrid() {
    "$FLOWGRID_BIN" --nats-url "$NATS_URL" "$@"
}

# COORDINATORS must be a number from 1 up, written without leading zeros (bash would read
# 010 as octal); $1 says what 0 would mean.
check_coordinators() {
    [[ "$COORDINATORS" =~ ^0+$ ]] && die "COORDINATORS=$COORDINATORS $1"
    [[ "$COORDINATORS" =~ ^0[0-9]+$ ]] && die "COORDINATORS=$COORDINATORS has a leading zero (read as octal); write it as COORDINATORS=$((10#$COORDINATORS))"
    [[ "$COORDINATORS" =~ ^[1-9][0-9]*$ ]] || die "COORDINATORS=$COORDINATORS is not a number; use e.g. COORDINATORS=3"
}

# check_number NAME MIN MAX WHAT EXAMPLE: dies unless the variable NAME is a number from MIN
# to MAX written without leading zeros (bash reads 010 as octal, and a word as a variable).
check_number() {
    local name=$1 min=$2 max=$3 what=$4 example=$5 value=${!1}
    if [[ "$value" =~ ^(0|[1-9][0-9]*)$ ]] && ((${#value} <= ${#max} && value >= min && value <= max)); then
        return 0
    fi
    die "$name=$value is not $what: use a number from $min to $max without leading zeros, e.g. $name=$example"
}

# Dies when a port, the shard count or a timeout is not a number in its range.
check_settings() {
    check_number NATS_PORT 1 65535 "a port" 4222
    check_number METRICS_PORT 1 65535 "a port" 9464
    check_number UI_PORT 1 65535 "a port" 8480
    check_number SHARDS 1 65536 "a shard count" 64
    check_number UP_TIMEOUT_SECONDS 1 86400 "a number of seconds" 60
    check_number LEAVE_TIMEOUT_SECONDS 1 86400 "a number of seconds" 30
}

# The settings a running grid was started with (ports, shards): `up` writes them, and
# `scale` and `status` use them, whatever the caller's environment says.
settings_file() {
    printf '%s/grid.env' "$GRID_DIR"
}

load_settings() {
    local file
    file=$(settings_file)
    [[ -f "$file" && -n "$(live_pid nats)" ]] || return 0
    # shellcheck disable=SC1090
    . "$file"
    NATS_URL=nats://127.0.0.1:$NATS_PORT
}

# Dies when two of the grid's ports (NATS, the UI, the coordinators' metrics) are the same,
# or when the last metrics port is past 65535.
check_ports_distinct() {
    local last_metrics=$((METRICS_PORT + COORDINATORS - 1)) port name
    ((last_metrics <= 65535)) || die "the metrics ports of $COORDINATORS coordinator(s) from METRICS_PORT=$METRICS_PORT" \
        "run past 65535 (to $last_metrics): use a lower METRICS_PORT"
    [[ "$NATS_PORT" != "$UI_PORT" ]] || die "NATS_PORT and UI_PORT are both $UI_PORT: give them different ports"
    for name in NATS_PORT UI_PORT; do
        port=${!name}
        if ((port >= METRICS_PORT && port <= last_metrics)); then
            die "$name=$port is among the coordinators' metrics ports ($METRICS_PORT-$last_metrics, one per" \
                "coordinator from METRICS_PORT): move one of them"
        fi
    done
}

# Starts the web UI and records its pid; waits until it listens.
start_ui() {
    say "starting the web UI on http://127.0.0.1:$UI_PORT/ (log $GRID_DIR/ui.log)"
    start_bg "$GRID_DIR/ui.log" "$FLOWGRID_BIN" --nats-url "$NATS_URL" ui --listen "127.0.0.1:$UI_PORT" --actions
    record_pid ui "$STARTED_PID"
    WATCH_PIDS="$STARTED_PID" wait_until 15 "the web UI on port $UI_PORT" port_open "$UI_PORT"
}

# Starts coordinator-$1 and records its pid; STARTED_PID is its pid.
start_coordinator() {
    local index=$1 port log
    port=$(metrics_port "$index")
    log=$(coordinator_log "$index")
    say "starting coordinator-$index (metrics http://127.0.0.1:$port/metrics, log $log)"
    start_bg "$log" "$FLOWGRID_BIN" coordinator --nats-url "$NATS_URL" \
        --data-dir "$GRID_DIR/data" --shards "$SHARDS" --metrics-addr "127.0.0.1:$port"
    record_pid "coordinator-$index" "$STARTED_PID"
}

# Dies when a metrics port of the coordinators $@ is taken.
check_metrics_ports() {
    local index port
    for index in "$@"; do
        port=$(metrics_port "$index")
        if port_open "$port"; then
            die "127.0.0.1:$port (metrics of coordinator-$index) is in use by another program: stop it or use METRICS_PORT=..."
        fi
    done
}

# The settings of the running grid that differ from the defaults, as make variables with a
# leading space (" NATS_PORT=4333"): for the advice to start the grid again.
other_settings() {
    [[ "$NATS_PORT" == 4222 ]] || printf ' NATS_PORT=%s' "$NATS_PORT"
    [[ "$UI_PORT" == 8480 ]] || printf ' UI_PORT=%s' "$UI_PORT"
    [[ "$SHARDS" == 64 ]] || printf ' SHARDS=%s' "$SHARDS"
}

# Before `scale` starts any coordinator: dies when the metrics port of one of the
# coordinators $@ is past 65535, is the grid's NATS or UI port, or is in use. The metrics
# ports follow from the running grid's METRICS_PORT, so the way out is to start the grid
# again with another.
check_scale_ports() {
    local index port name again
    again="'make down && make up COORDINATORS=$COORDINATORS$(other_settings) METRICS_PORT=...'"
    for index in "$@"; do
        port=$(metrics_port "$index")
        if ((port > 65535)); then
            die "coordinator-$index would serve metrics on port $port (METRICS_PORT=$METRICS_PORT plus $((index - 1))), past" \
                "65535; nothing was started. To move the grid's metrics ports: $again with a lower METRICS_PORT"
        fi
        for name in NATS_PORT UI_PORT; do
            if ((port == ${!name})); then
                die "coordinator-$index would serve metrics on port $port, the grid's $name; nothing was started." \
                    "Start the grid again with its ports apart: $again (or another $name)"
            fi
        done
        if port_open "$port"; then
            die "127.0.0.1:$port (metrics of coordinator-$index) is in use by another program; nothing was started." \
                "Stop it, or move the grid's metrics ports: $again"
        fi
    done
}

# The live pids of the coordinators $@, space-separated.
coordinator_pids() {
    local index pid pids=""
    for index in "$@"; do
        pid=$(live_pid "coordinator-$index")
        [[ -z "$pid" ]] || pids+=" $pid"
    done
    printf '%s' "$pids"
}

# Dies before `up` starts anything when the data dir belongs to a grid with another shard
# count than SHARDS: each coordinator would refuse it at once (the shard of a run is
# hash(run_id) % shards, fixed when the grid was made). The coordinator's grid.json
# ({"prefix": ..., "shards": N}) records the count; a directory from before that file is
# judged by its highest shard file, as the coordinator does.
check_data_shards() {
    local data=$GRID_DIR/data file recorded highest=-1 number
    local fresh="or 'make clean-grid' to delete it (every flow and run) and start a new grid"
    if [[ -f "$data/grid.json" ]]; then
        recorded=$(python3 -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["shards"]))' \
            "$data/grid.json" 2>/dev/null || true)
        # An unreadable file: the coordinators say what is wrong with it.
        [[ "$recorded" =~ ^[0-9]+$ ]] || return 0
        if ((recorded != SHARDS)); then
            die "the grid in $data has $recorded shards, not SHARDS=$SHARDS: use SHARDS=$recorded, $fresh"
        fi
        return 0
    fi
    for file in "$data"/shard-*.redb; do
        number=${file##*/shard-}
        number=${number%.redb}
        [[ "$number" =~ ^[0-9]+$ ]] || continue
        if ((10#$number > highest)); then
            highest=$((10#$number))
        fi
    done
    if ((highest >= SHARDS)); then
        die "$data holds shard files up to shard $highest, so its grid has more than SHARDS=$SHARDS shards:" \
            "use the SHARDS it was made with, $fresh"
    fi
}

# True when the process $1 is an alive (not draining, not dead) member of the grid.
member_alive() {
    flowgrid members --json | python3 -c '
import json, sys
pid = int(sys.argv[1])
sys.exit(0 if any(m["pid"] == pid and m["state"] == "alive" for m in json.load(sys.stdin)) else 1)
' "$1"
}

# Prints `moving` while some shard has no serving live owner, else a digest of who owns
# which shard.
shard_ownership() {
    flowgrid shards --all --json | python3 -c '
import hashlib, json, sys
shards = json.load(sys.stdin)
if not shards["all_serving"]:
    print("moving")
else:
    owners = ",".join(str(claim.get("owner")) for claim in shards["claims"])
    print(hashlib.sha256(owners.encode()).hexdigest())
'
}

# wait_settled SECONDS: waits until every shard is served by a live coordinator and the
# owners held still for SETTLE_POLLS polls. Each pid in WATCH_PIDS must stay alive.
wait_settled() {
    local seconds=$1 deadline=$((SECONDS + $1)) ownership last="" same=0 pid
    while :; do
        ownership=$(shard_ownership 2>/dev/null || echo unknown)
        if [[ "$ownership" != moving && "$ownership" != unknown && "$ownership" == "$last" ]]; then
            same=$((same + 1))
        else
            same=0
        fi
        last=$ownership
        ((same + 1 >= SETTLE_POLLS)) && return 0
        for pid in ${WATCH_PIDS:-}; do
            alive "$pid" || { say "process $pid exited while waiting for the shards to settle"; return 1; }
        done
        if ((SECONDS >= deadline)); then
            say "timed out after ${seconds}s waiting for every shard to be served; shards now:"
            flowgrid shards >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# wait_joined INDEX...: waits until each coordinator-<index> is an alive member.
wait_joined() {
    local index pid
    for index in "$@"; do
        pid=$(live_pid "coordinator-$index")
        [[ -n "$pid" ]] || { say "coordinator-$index exited"; return 1; }
        WATCH_PIDS="$pid" wait_until "$UP_TIMEOUT_SECONDS" "coordinator-$index (pid $pid) to join the grid" \
            member_alive "$pid" || return 1
    done
}

up() {
    local running=() indices=() index nats_pid worker_pid watch="" component
    check_coordinators "starts no coordinator: a grid needs at least one (COORDINATORS=1 is the default)"
    check_settings
    nats_pid=$(live_pid nats)
    worker_pid=$(live_pid worker)
    mapfile -t indices < <(coordinator_indices)
    [[ -n "$nats_pid" ]] && running+=(nats)
    [[ -n "$worker_pid" ]] && running+=(worker)
    # The UI of an earlier grid holds UI_PORT: `make down` stops it.
    [[ -n "$(live_pid ui)" ]] && running+=(ui)
    ((${#indices[@]} > 0)) && running+=("${#indices[@]} coordinator(s)")
    [[ -n "$(live_pid coordinator)" ]] && running+=("coordinator (from an older make up)")
    if [[ -n "$nats_pid" && -n "$worker_pid" && ${#indices[@]} -gt 0 ]]; then
        load_settings
        if [[ -z "$(live_pid ui)" ]]; then
            # The UI would fail to listen, and the other program's port would pass for it.
            if port_open "$UI_PORT"; then
                die "the grid is up but its web UI is not running, and 127.0.0.1:$UI_PORT (the grid's UI_PORT) is in" \
                    "use by another program: stop that program and run 'make up' again, or move the UI with" \
                    "'make down' and 'make up UI_PORT=...'"
            fi
            say "the web UI is not running (its log: $GRID_DIR/ui.log); starting it again"
            start_ui || die "the web UI did not start; see $GRID_DIR/ui.log"
        fi
        # A plain `make up` passes the Makefile's default COORDINATORS=1: no number was asked for.
        if ((${#indices[@]} == COORDINATORS)) || [[ -z "$COORDINATORS_GIVEN" ]]; then
            say "grid is already up (nats, worker, ${#indices[@]} coordinator(s)); 'make down' stops it"
        else
            say "grid is already up with ${#indices[@]} coordinator(s); 'make scale COORDINATORS=$COORDINATORS' changes that"
        fi
        return 0
    fi
    if ((${#running[@]} > 0)); then
        die "a partial grid is running (${running[*]}): run 'make down' first"
    fi
    [[ -x "$FLOWGRID_BIN" ]] || die "$FLOWGRID_BIN not found: run 'make build'"
    check_ports_distinct
    check_data_shards
    load_tools "$ROOT"
    port_open "$NATS_PORT" && die "127.0.0.1:$NATS_PORT is in use by another program: stop it or use NATS_PORT=..."
    port_open "$UI_PORT" && die "127.0.0.1:$UI_PORT is in use by another program: stop it or use UI_PORT=..."
    check_metrics_ports $(seq 1 "$COORDINATORS")
    mkdir -p "$GRID_DIR/nats" "$GRID_DIR/data" "$GRID_DIR/bin"
    # Left by a grid that stopped without `make down` (a reboot): none of those runs now.
    rm -f "$(scale_started_file)"
    # The grid runs a copy of the binary: a rebuild does not change what it runs, and
    # `scale` starts the same version as the coordinators already up.
    cp "$FLOWGRID_BIN" "$GRID_DIR/bin/flowgrid.new" && mv -f "$GRID_DIR/bin/flowgrid.new" "$GRID_DIR/bin/flowgrid" \
        || die "cannot copy $FLOWGRID_BIN to $GRID_DIR/bin"
    FLOWGRID_BIN=$GRID_DIR/bin/flowgrid
    printf 'NATS_PORT=%s\nMETRICS_PORT=%s\nUI_PORT=%s\nSHARDS=%s\nFLOWGRID_BIN=%q\n' \
        "$NATS_PORT" "$METRICS_PORT" "$UI_PORT" "$SHARDS" "$FLOWGRID_BIN" >"$(settings_file)"

    say "starting nats-server on 127.0.0.1:$NATS_PORT (store $GRID_DIR/nats, log $GRID_DIR/nats.log)"
    start_bg "$GRID_DIR/nats.log" "$NATS_SERVER_BIN" -c "$ROOT/deploy/nats-server.conf" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$GRID_DIR/nats"
    record_pid nats "$STARTED_PID"
    WATCH_PIDS="$STARTED_PID" wait_until 15 "nats-server on port $NATS_PORT" port_open "$NATS_PORT" \
        || fail_up

    say "starting $COORDINATORS coordinator(s) on data dir $GRID_DIR/data with $SHARDS shards"
    for index in $(seq 1 "$COORDINATORS"); do
        start_coordinator "$index"
        watch+=" $STARTED_PID"
    done

    say "starting demo workers for $WORKER_POOLS (log $GRID_DIR/worker.log)"
    start_bg "$GRID_DIR/worker.log" "$FLOWGRID_BIN" --nats-url "$NATS_URL" worker --pools "$WORKER_POOLS"
    record_pid worker "$STARTED_PID"
    watch+=" $STARTED_PID"

    start_ui || fail_up
    watch+=" $(live_pid ui)"

    say "waiting for the coordinators to join and serve all $SHARDS shards (up to ${UP_TIMEOUT_SECONDS}s each)"
    wait_joined $(seq 1 "$COORDINATORS") || fail_up
    WATCH_PIDS="$watch" wait_settled "$UP_TIMEOUT_SECONDS" || fail_up
    WATCH_PIDS="$watch" wait_until "$UP_TIMEOUT_SECONDS" "the coordinators to answer 'flowgrid flow list'" \
        flowgrid flow list || fail_up
    # The worker and the UI may have exited after their start (a pool name they refuse).
    for component in worker ui; do
        [[ -n "$(live_pid "$component")" ]] || { say "the $component exited"; fail_up; }
    done

    flowgrid shards >&2 || true
    cat <<USAGE
flowgrid is up: NATS $NATS_URL, $COORDINATORS coordinator(s) (metrics from http://127.0.0.1:$METRICS_PORT/metrics), logs in $GRID_DIR/
Web UI: http://127.0.0.1:$UI_PORT/ (flows, runs step by step, coordinators and backlog; deploy, start, signal, cancel)

  $FLOWGRID_BIN flow deploy deploy/flows/media-pipeline.yaml
  $FLOWGRID_BIN run start media-pipeline --input '{"video": "talk.mp4", "segments": [{"index": 0}], "language_hint": "auto"}' --wait
  $FLOWGRID_BIN run list
  make status                    # processes, members, shards, backlog, deployed flows
  make scale COORDINATORS=3      # add or remove coordinators
  make down                      # stop the grid (data stays in $GRID_DIR/data; make clean-grid removes it)
USAGE
    if [[ "$NATS_PORT" != 4222 ]]; then
        echo "(NATS is not on the default port: pass --nats-url $NATS_URL to flowgrid.)"
    fi
}

fail_up() {
    local logs=("$GRID_DIR/nats.log") index
    for index in $(seq 1 "$COORDINATORS"); do
        logs+=("$(coordinator_log "$index")")
    done
    logs+=("$GRID_DIR/worker.log" "$GRID_DIR/ui.log")
    print_log_tails "${logs[@]}"
    down
    die "the grid did not come up (logs above)"
}

# Brings the running grid to $COORDINATORS coordinators: starts the lowest missing indices,
# or stops coordinators one at a time with SIGTERM (a graceful leave): first those a scale-out
# started that has not succeeded yet (so going back after a failed one stops what it added,
# not a coordinator that served all along), then the highest. Scaling out, or at the number
# already running (a retry), it waits until every coordinator joined and every shard is
# served. A scale that succeeds forgets which coordinators scale-outs started.
scale() {
    local indices=() order=() index pid current missing=() started=() all=() watch=""
    [[ -n "$COORDINATORS_GIVEN" ]] || die "say how many coordinators the grid should run, e.g. 'make scale COORDINATORS=3'" \
        "(a bare 'make scale' would mean 1; 'make status' shows how many run)"
    check_coordinators "would stop every coordinator: use 'make down' to stop the grid"
    [[ -n "$(live_pid nats)" ]] || die "the grid is not up: run 'make up COORDINATORS=$COORDINATORS'"
    load_settings
    check_settings
    [[ -x "$FLOWGRID_BIN" ]] || die "$FLOWGRID_BIN not found: run 'make build'"
    mapfile -t indices < <(coordinator_indices)
    current=${#indices[@]}
    if ((current <= COORDINATORS)); then
        index=0
        while ((current + ${#missing[@]} < COORDINATORS)); do
            index=$((index + 1))
            [[ -n "$(live_pid "coordinator-$index")" ]] || missing+=("$index")
        done
        # Every port is checked before any coordinator starts: none is left half done.
        check_scale_ports "${missing[@]}"
        if ((current == COORDINATORS)); then
            say "the grid already runs $current coordinator(s); checking that each joined and every shard is served"
        else
            say "scaling out from $current to $COORDINATORS coordinators"
        fi
        for index in "${missing[@]}"; do
            start_coordinator "$index"
            started+=("$index")
            printf '%s\n' "$index" >>"$(scale_started_file)"
        done
        # The coordinators already running too: a retry waits for those an earlier try started.
        mapfile -t all < <({ coordinator_indices; printf '%s\n' "${started[@]}"; } | grep -x '[0-9][0-9]*' | sort -nu)
        watch=$(coordinator_pids "${all[@]}")
        if ! wait_joined "${all[@]}" || ! WATCH_PIDS="$watch" wait_settled "$UP_TIMEOUT_SECONDS"; then
            scale_failed "$current" "${all[@]}"
        fi
    else
        say "scaling in from $current to $COORDINATORS coordinators, one at a time"
        # Those an unfinished scale-out started first, then the highest.
        mapfile -t order < <({ scale_started_indices; printf '%s\n' "${indices[@]}" | sort -nr; } | awk '!seen[$0]++')
        while ((current > COORDINATORS)); do
            index=${order[${#indices[@]} - current]}
            pid=$(live_pid "coordinator-$index")
            if [[ -n "$pid" ]]; then
                leave "$index" "$pid"
            fi
            rm -f "$(pid_file "coordinator-$index")"
            current=$((current - 1))
            # The next one leaves once its peers serve every shard again.
            wait_settled "$UP_TIMEOUT_SECONDS" \
                || die "the shards did not settle after coordinator-$index left; 'make status' shows the grid," \
                    "'make scale COORDINATORS=$COORDINATORS' goes on"
        done
    fi
    rm -f "$(scale_started_file)"
    flowgrid shards
}

# scale_failed BEFORE INDEX...: the logs of the coordinators INDEX... (only of those not
# alive members when there are such), and what to type; dies. BEFORE: how many ran before.
scale_failed() {
    local before=$1 index pid late=() back=""
    shift
    for index in "$@"; do
        pid=$(live_pid "coordinator-$index")
        if [[ -z "$pid" ]] || ! member_alive "$pid" 2>/dev/null; then
            late+=("$index")
        fi
    done
    ((${#late[@]} > 0)) || late=("$@")
    for index in "${late[@]}"; do
        print_log_tails "$(coordinator_log "$index")"
    done
    if ((before < COORDINATORS)); then
        back=", 'make scale COORDINATORS=$before' goes back to $before (it stops the ones started to scale out first)"
    fi
    die "the grid did not reach $COORDINATORS coordinator(s) serving every shard (logs above). The coordinators" \
        "that run stay up: 'make status' shows them, 'make scale COORDINATORS=$COORDINATORS' waits again (and" \
        "starts any that exited)$back"
}

# leave INDEX PID: SIGTERM, then waits for the graceful leave (bounded) before kill -9.
leave() {
    local index=$1 pid=$2 since=$SECONDS
    say "stopping coordinator-$index (pid $pid) with SIGTERM: it hands its shards over and leaves"
    kill -TERM "$pid" 2>/dev/null || return 0
    if wait_gone "$LEAVE_TIMEOUT_SECONDS" "$pid"; then
        say "coordinator-$index left after $((SECONDS - since))s"
    else
        say "coordinator-$index did not leave within ${LEAVE_TIMEOUT_SECONDS}s; killed it with kill -9" \
            "(the others take its shards once its lease runs out)"
        kill -KILL "$pid" 2>/dev/null || true
        print_log_tails "$(coordinator_log "$index")"
    fi
}

down() {
    local pid stopped=0 index coordinators=() component
    for component in ui worker; do
        pid=$(live_pid "$component")
        if [[ -n "$pid" ]]; then
            stop_pid "$pid" "$component"
            stopped=$((stopped + 1))
        fi
        rm -f "$(pid_file "$component")"
    done
    # Every coordinator at once: none is left to take shards over, so each only commits
    # and releases what it holds.
    for index in $(coordinator_indices); do
        coordinators+=("$(live_pid "coordinator-$index") coordinator-$index")
    done
    pid=$(live_pid coordinator)
    [[ -n "$pid" ]] && coordinators+=("$pid coordinator")
    if ((${#coordinators[@]} > 0)); then
        stop_pids "$LEAVE_TIMEOUT_SECONDS" "${coordinators[@]}"
        stopped=$((stopped + ${#coordinators[@]}))
    fi
    rm -f "$GRID_DIR"/coordinator-*.pid "$(pid_file coordinator)"
    pid=$(live_pid nats)
    if [[ -n "$pid" ]]; then
        stop_pid "$pid" nats
        stopped=$((stopped + 1))
    fi
    rm -f "$(pid_file nats)" "$(settings_file)" "$(scale_started_file)"
    if ((stopped == 0)); then
        say "grid is not running"
    else
        say "grid stopped"
    fi
}

status() {
    local component pid index live=0
    load_settings
    check_settings
    for component in nats worker ui; do
        pid=$(live_pid "$component")
        if [[ "$component" == ui && -n "$pid" ]]; then
            printf '%-15s running  pid %s, http://127.0.0.1:%s/\n' "$component" "$pid" "$UI_PORT"
        elif [[ -n "$pid" ]]; then
            printf '%-15s running  pid %s\n' "$component" "$pid"
        else
            printf '%-15s stopped\n' "$component"
        fi
    done
    for index in $(coordinator_indices); do
        printf '%-15s running  pid %s, metrics http://127.0.0.1:%s/metrics\n' "coordinator-$index" \
            "$(live_pid "coordinator-$index")" "$(metrics_port "$index")"
        live=$((live + 1))
    done
    ((live > 0)) || printf '%-15s none running\n' "coordinators"
    [[ -n "$(live_pid nats)" ]] || return 0
    printf '\n'
    flowgrid status || true
    if ((live > 0)); then
        printf '\nflows:\n'
        flowgrid flow list || true
    fi
}

# Removes the grid's state (store and broker data); refuses while the grid runs.
clean() {
    local component
    for component in nats worker ui coordinator; do
        [[ -z "$(live_pid "$component")" ]] || die "the grid is running ($component): run 'make down' first"
    done
    [[ -z "$(coordinator_indices)" ]] || die "the grid is running (coordinators): run 'make down' first"
    say "removing $GRID_DIR/data and $GRID_DIR/nats"
    rm -rf "$GRID_DIR/data" "$GRID_DIR/nats"
}

case "${1:-}" in
    up) up ;;
    scale) scale ;;
    down) down ;;
    status) status ;;
    clean) clean ;;
    *) die "usage: $0 up|scale|down|status|clean" ;;
esac
