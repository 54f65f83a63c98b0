#!/usr/bin/env python3
"""A flowgrid client in Python, written from docs/protocol.md only.

Starts a run of a flow with a NATS request to `<prefix>.api.run.start` (JSON), then, with
--wait, asks `<prefix>.api.run.get` until the run has ended and prints its view as JSON.
Every start carries an idempotency key (--idempotency-key, else a random one), so a start
whose reply was lost is retried without starting a second run. Exit status 0 if the run
succeeded (or was only started), 1 if it ended otherwise, 2 if the grid refused a request
or did not answer, or the arguments are wrong (--input that is not JSON).

usage: client.py --nats-url nats://127.0.0.1:4222 --prefix flowgrid --flow NAME
                 [--input JSON] [--idempotency-key KEY] [--wait SECONDS]
"""

import argparse
import asyncio
import json
import sys
import time
import uuid

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

HEADERS = {"Content-Type": "application/json"}
REQUEST_TIMEOUT_SECONDS = 5
POLL_SECONDS = 0.1


class Refused(Exception):
    """The grid answered with an error: `code` says what to do (docs/protocol.md, Errors)."""

    def __init__(self, error):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.retryable = bool(error.get("retryable"))


async def call(nc, prefix, verb, request):
    """One API request; retries a timeout or a retryable refusal a few times (only requests
    safe to repeat: `run.get`, and `run.start` with an idempotency key)."""
    for attempt in range(5):
        try:
            reply = await nc.request(
                f"{prefix}.api.{verb}", json.dumps(request).encode(), timeout=REQUEST_TIMEOUT_SECONDS, headers=HEADERS
            )
        except (NatsTimeoutError, NoRespondersError):
            # The request may have been served with its reply lost: repeated, a start with
            # the same idempotency key returns the run the first one started.
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        answer = json.loads(reply.data)
        if "ok" in answer:
            return answer["ok"]
        refused = Refused(answer["error"])
        if not refused.retryable:
            raise refused
        await asyncio.sleep(0.2 * (attempt + 1))
    raise TimeoutError(f"no answer to {verb} after 5 tries")


async def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="flowgrid")
    parser.add_argument("--flow", required=True)
    parser.add_argument("--input", default="null", help="the run's input, as JSON")
    parser.add_argument(
        "--idempotency-key",
        help="starting again with the same key returns the same run (default: a random key, so that a start "
        "retried after a lost reply starts one run)",
    )
    parser.add_argument("--wait", type=float, help="wait this many seconds for the run to end, and print it")
    args = parser.parse_args(argv)
    try:
        run_input = json.loads(args.input)
    except json.JSONDecodeError as error:
        # argparse's own usage error: exit status 2, nothing sent.
        parser.error(f"--input is not JSON ({error}): give the run's input as JSON, such as '{{\"n\": 1}}'")

    nc = await nats.connect(args.nats_url)
    try:
        # A key on every start makes it safe to retry: without one, a start whose reply was
        # lost may have created a run, and the retry would create another.
        start = {
            "flow": args.flow,
            "input": run_input,
            "idempotency_key": args.idempotency_key or str(uuid.uuid4()),
        }
        started = await call(nc, args.prefix, "run.start", start)
        print(f"started run {started['run_id']} of {started['flow']}@{started['version']}", file=sys.stderr)
        if args.wait is None:
            print(json.dumps(started))
            return 0
        deadline = time.monotonic() + args.wait
        while True:
            view = await call(nc, args.prefix, "run.get", {"run_id": started["run_id"]})
            if view["status"] != "running":
                print(json.dumps(view))
                return 0 if view["status"] == "succeeded" else 1
            if time.monotonic() > deadline:
                print(f"run {started['run_id']} did not end within {args.wait} s", file=sys.stderr)
                return 2
            await asyncio.sleep(POLL_SECONDS)
    except (Refused, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
