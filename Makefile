# flowgrid: the front door. `make help` prints this header.
#
#   make demo        install what is missing, build, run the media-pipeline demo on a
#                    throw-away local grid, print the result, stop everything
#   make test        what CI runs: setup, fmt check, build, all tests (default members), schema drift,
#                    FoundationDB type-check, dependency-direction check
#   make setup       install pinned nats-server, nats-py, msgpack (.grid/venv) and
#                    libclang-dev (apt-get, as root); skips what is present
#   make build       cargo build --bins (debug)
#   make tools       the Python tools only (nats-server, nats-py, msgpack); no system packages
#   make up          start a local grid in the background: nats-server on 127.0.0.1:NATS_PORT,
#                    a coordinator (data .grid/data), demo workers for gpu-llm and cpu-media
#   make down        stop what `make up` started (safe to run twice)
#   make status      processes of the local grid and the deployed flows
#   make schemas     regenerate the JSON Schemas in schemas/ from the Rust types
#   make check-fdb   type-check the FoundationDB backend (needs libclang-dev)
#   make check-deps  the pure core crates must not depend on tokio, async-nats, redb, foundationdb
#   make fmt         cargo fmt
#   make lint        cargo fmt --check and clippy with warnings denied
#   make clean-grid  delete the local grid's data (.grid/data, .grid/nats); the grid must be down
#   make loadtest    build release binaries and run the load-test harness on a throw-away grid
#                    (LOADTEST_ARGS, default: a 60 s closed-loop chain-of-3 run; see docs/performance.md)
#   make help        this text
#
# Variables (override on the command line, e.g. `make up NATS_PORT=4333`):
#   CARGO=cargo NATS_PORT=4222 METRICS_PORT=9464 SHARDS=256 WORKER_POOLS=gpu-llm,cpu-media
#   TARGET_DIR=$CARGO_TARGET_DIR or target  LOADTEST_ARGS="run --workload single --duration 30s"

CARGO ?= cargo
NATS_PORT ?= 4222
METRICS_PORT ?= 9464
SHARDS ?= 256
WORKER_POOLS ?= gpu-llm,cpu-media
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
LOADTEST_ARGS ?= run --workload chain --tasks-per-run 3 --mode closed --concurrency 256 --duration 60s
FLOWGRID_BIN ?= $(abspath $(TARGET_DIR)/debug/flowgrid)

# Every recipe line runs in bash and stops at the first failing command.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
export CARGO NATS_PORT METRICS_PORT SHARDS WORKER_POOLS FLOWGRID_BIN

# Loads NATS_SERVER_BIN (the pinned nats-server) written by deploy/setup.sh.
LOAD_TOOLS := source deploy/lib.sh && load_tools "$$PWD"

.PHONY: help setup tools build demo test up down status schemas check-fdb check-deps fmt lint clean-grid loadtest

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
	@echo "==> cargo fmt --all -- --check"
	$(CARGO) fmt --all -- --check
	@echo "==> cargo build --bins (the end-to-end tests spawn the built binary)"
	$(CARGO) build --bins
	@echo "==> workspace tests"
	$(LOAD_TOOLS); echo "NATS_SERVER_BIN=$$NATS_SERVER_BIN"; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	    echo "==> cargo nextest run --no-fail-fast"; \
	    $(CARGO) nextest run --no-fail-fast; \
	else \
	    echo "==> cargo-nextest is not installed; falling back to cargo test"; \
	    $(CARGO) test --no-fail-fast; \
	fi
	@echo "==> doc tests"
	$(CARGO) test --doc
	@echo "==> flowgrid schemas --check (schemas/ must match the Rust types; make schemas regenerates them)"
	$(FLOWGRID_BIN) schemas --out schemas --check
	@echo "==> FoundationDB backend type-check"
	./deploy/check-fdb.sh --skip-if-missing
	@echo "==> dependency direction"
	./deploy/check-deps.sh
	@echo "==> make test: all checks passed"

up: tools build
	./deploy/grid.sh up

down:
	./deploy/grid.sh down

status:
	./deploy/grid.sh status

schemas: build
	$(FLOWGRID_BIN) schemas --out schemas

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
	$(LOAD_TOOLS); $(TARGET_DIR)/release/flowgrid-loadtest $(LOADTEST_ARGS)
