# flowgrid: the front door. `make help` prints this header.
#
#   make demo        install what is missing, build, run the media-pipeline demo on a
#                    throw-away local grid, print the result, stop everything
#   make test        what CI runs: setup, fmt check, build, all tests (default members), schema drift,
#                    FoundationDB type-check, dependency-direction check
#   make setup       install pinned nats-server, nats-py, msgpack (.grid/venv) and
#                    libclang-dev (apt-get, as root); skips what is present
#   make build       cargo build --bins (debug)
#   make tools       the Python tools only (nats-server, nats-py, msgpack); as root, python3-venv where
#                    it is missing, but no other system package
#   make up          start a local grid in the background: nats-server on 127.0.0.1:NATS_PORT,
#                    COORDINATORS coordinators sharing .grid/data (metrics on METRICS_PORT,
#                    METRICS_PORT+1, ...), demo workers for WORKER_POOLS, the web UI on
#                    http://127.0.0.1:UI_PORT/; waits until every shard is served
#   make scale       bring the running grid to COORDINATORS coordinators (required): start the missing
#                    ones, or stop one at a time (graceful leave) those a failed scale-out started, then
#                    the highest-numbered; no rebuild
#   make down        stop what `make up` and `make scale` started (safe to run twice)
#   make status      processes of the local grid, members, shards, backlog and deployed flows
#   make schemas     regenerate the JSON Schemas in schemas/ from the Rust types
#   make check-fdb   type-check the FoundationDB backend (needs libclang-dev)
#   make check-deps  the pure core crates must not depend on tokio, async-nats, redb, foundationdb
#   make fmt         cargo fmt
#   make lint        cargo fmt --check and clippy with warnings denied
#   make clean-grid  delete the local grid's data (.grid/data, .grid/nats); the grid must be down
#   make loadtest    build release binaries and run the load-test harness on a throw-away grid
#                    (LOADTEST_ARGS, default: a 60 s closed-loop chain-of-3 run; see docs/performance.md)
#   make targets     every performance target in one go (chain-of-3 and 1-task throughput against
#                    the broker floor, half-load latencies, map, memory, overload), each step on a
#                    grid of its own, then a table of target, measured value and verdict (~7 min)
#   make profile     a load-test run (PROFILE_ARGS) with the coordinator sampled by perf: a flame
#                    graph, the folded stacks and a summary in TARGET_DIR/profile (needs perf)
#   make chaos       build release binaries and run the chaos test for DURATION seconds: several
#                    coordinators under load, killed, paused, cut off from NATS (as root), added and
#                    removed; then every run is checked and the store audited (see docs/operations.md)
#   make help        this text
#
# Variables (override on the command line, e.g. `make up NATS_PORT=4333`):
#   CARGO=cargo NATS_PORT=4222 METRICS_PORT=9464 UI_PORT=8480 SHARDS=64 WORKER_POOLS=gpu-llm,cpu-media,tests
#   COORDINATORS=1 (make up; make scale needs it given)  DURATION=120 (make chaos, seconds; or 10m)
#   CHAOS_ARGS="--seed 7 --coordinators 5" (more flags of `flowgrid-loadtest chaos`)
#   TARGET_DIR=$CARGO_TARGET_DIR or target  LOADTEST_ARGS="run --workload single --duration 30s"
#   PROFILE_ARGS="run --workload chain --duration 20s --no-floor --profile-duration 10s"
#   TARGETS_ARGS="--steps chain,half-load --fail-on-miss" (more flags of `flowgrid-loadtest targets`)

CARGO ?= cargo
NATS_PORT ?= 4222
METRICS_PORT ?= 9464
UI_PORT ?= 8480
SHARDS ?= 64
WORKER_POOLS ?= gpu-llm,cpu-media,tests
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
LOADTEST_ARGS ?= run --workload chain --tasks-per-run 3 --mode closed --concurrency 512 --duration 60s
COORDINATORS ?= 1
DURATION ?= 120
CHAOS_ARGS ?=
TARGETS_ARGS ?=
PROFILE_ARGS ?= run --workload single --mode closed --concurrency 512 --duration 20s --no-floor --profile-duration 10s
FLOWGRID_BIN ?= $(abspath $(TARGET_DIR)/debug/flowgrid)
# The harnesses start the release build of flowgrid, whatever FLOWGRID_BIN says.
RELEASE_FLOWGRID_BIN := $(abspath $(TARGET_DIR)/release/flowgrid)

# Every recipe line runs in bash and stops at the first failing command.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
export CARGO NATS_PORT METRICS_PORT UI_PORT SHARDS WORKER_POOLS COORDINATORS FLOWGRID_BIN

# Loads NATS_SERVER_BIN (the pinned nats-server) written by deploy/setup.sh.
LOAD_TOOLS := source deploy/lib.sh && load_tools "$$PWD"

.PHONY: help setup tools build demo test up scale down status schemas check-fdb check-deps fmt lint clean-grid loadtest \
	targets profile chaos

help:
	@awk 'NR == 1, !/^#/ { if (/^#/) { sub(/^# ?/, ""); print } }' $(firstword $(MAKEFILE_LIST))

setup:
	./deploy/setup.sh

# The Python tools only (no system packages): what the demo and the local grid need.
tools:
	SETUP_SKIP_SYSTEM=1 ./deploy/setup.sh

build:
	$(CARGO) build --bins

demo:
	./deploy/demo.sh

test: setup
	@echo "==> $$(date +%T) cargo fmt --all -- --check"
	$(CARGO) fmt --all -- --check
	@echo "==> $$(date +%T) cargo build --bins (the end-to-end tests spawn the built binary)"
	$(CARGO) build --bins
	@echo "==> $$(date +%T) workspace tests"
	$(LOAD_TOOLS); echo "NATS_SERVER_BIN=$$NATS_SERVER_BIN"; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	    echo "==> $$(date +%T) cargo nextest run --no-fail-fast"; \
	    $(CARGO) nextest run --no-fail-fast; \
	else \
	    echo "==> $$(date +%T) cargo-nextest is not installed; falling back to cargo test"; \
	    $(CARGO) test --no-fail-fast; \
	fi
	@echo "==> $$(date +%T) doc tests"
	$(CARGO) test --doc
	@echo "==> $$(date +%T) flowgrid schemas --check (schemas/ must match the Rust types; make schemas regenerates them)"
	"$(FLOWGRID_BIN)" schemas --out schemas --check
	@echo "==> $$(date +%T) FoundationDB backend type-check"
	./deploy/check-fdb.sh --skip-if-missing
	@echo "==> $$(date +%T) dependency direction"
	./deploy/check-deps.sh
	@echo "==> $$(date +%T) make test: all checks passed"

up: tools build
	COORDINATORS_ORIGIN='$(origin COORDINATORS)' ./deploy/grid.sh up

# Uses the binary the grid runs (no rebuild): one grid, one version. The script refuses
# COORDINATORS left at the default above (origin `file`): a bare `make scale` would stop
# all coordinators but one.
scale:
	COORDINATORS_ORIGIN='$(origin COORDINATORS)' ./deploy/grid.sh scale

down:
	./deploy/grid.sh down

status:
	./deploy/grid.sh status

schemas: build
	"$(FLOWGRID_BIN)" schemas --out schemas

check-fdb:
	./deploy/check-fdb.sh

check-deps:
	./deploy/check-deps.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

clean-grid:
	./deploy/grid.sh clean

# Starts its own nats-server and coordinator (release build) on free ports and stops them at the end.
loadtest: tools
	$(CARGO) build --release --bins -p flowgrid-cli -p flowgrid-loadtest
	$(LOAD_TOOLS); FLOWGRID_BIN="$(RELEASE_FLOWGRID_BIN)" "$(TARGET_DIR)/release/flowgrid-loadtest" $(LOADTEST_ARGS)

targets:
	$(MAKE) loadtest LOADTEST_ARGS="targets $(TARGETS_ARGS)"

profile:
	$(MAKE) loadtest LOADTEST_ARGS="$(PROFILE_ARGS) --profile $(abspath $(TARGET_DIR))/profile"

# Its own nats-server, coordinators and workers on free ports, all stopped at the end; exits
# non-zero when a run was lost, ended twice, or the audit of the store finds a violation.
chaos: tools
	$(CARGO) build --release --bins -p flowgrid-cli -p flowgrid-loadtest
	$(LOAD_TOOLS); duration='$(DURATION)'; [[ "$$duration" =~ ^[0-9]+$$ ]] && duration+=s; \
	"$(TARGET_DIR)/release/flowgrid-loadtest" chaos --duration "$$duration" --flowgrid-bin "$(RELEASE_FLOWGRID_BIN)" \
	    $(CHAOS_ARGS)
