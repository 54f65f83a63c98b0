#!/usr/bin/env python3
"""A flowgrid worker in Python, written from docs/protocol.md only.

It pulls tasks of one pool from JetStream, runs them, sends each result to the
coordinator as a NATS request, waits for the acknowledgement, and only then acks the
task message. Tasks of every priority: it pulls the pool's priority lanes, highest first
(docs/protocol.md, "Priority lanes"); a lane consumer it creates takes the pool consumer's
max_ack_pending and ack_wait, each lane's tasks are heartbeated by its own consumer's
ack_wait, and a lane whose consumer is gone (deleted) is bound again, which creates it.

Tasks: `echo` (returns its input), `upper` ({"text": s} -> {"text": S}), `double`
({"value": n} -> {"value": 2n}, or a bare number -> its double), `big` ({"bytes": n} ->
{"blob": n x's}: an output as large as asked, up to 4 MiB), `sleep` ({"ms": n}: waits,
returns its input), `steps` ({"to": n, "fail_at": k}: counts to n, reporting {"done": i}
after each step and starting from the progress an earlier attempt reported; the first
attempt fails after step k). Any other task name is reported as a non-retryable
`unknown_task` error, an output that cannot be encoded (an integer over 64 bits in
MessagePack) as a non-retryable `invalid_output` error; a task message that cannot be
decoded, or decodes to no task (a field missing or of the wrong type), is terminated. A task
whose run no longer needs it (a notice on `<prefix>.cancels.<pool>`) is stopped and acked
without a result; one still running a second past its deadline is abandoned with a
retryable `deadline_exceeded` error.

On SIGINT or SIGTERM it stops pulling, gives the task it runs `--shutdown-grace` seconds to
finish, hands it back (`nak`) if it has not, and exits (docs/protocol.md, "Stopping"); also
while it still waits for NATS or for its pool's stream at startup. It reconnects to NATS for
as long as it takes; should the connection be closed all the same, it stops and exits with
status 1, for whatever supervises it to start it again.

usage: worker.py --nats-url nats://127.0.0.1:4222 --prefix flowgrid --pool tests [--max-tasks N]
         [--shutdown-grace SECONDS]
"""

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid

import msgpack
import nats
from nats.errors import MaxPayloadError, NoRespondersError, TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError, ServiceUnavailableError

JSON_CONTENT_TYPE = "application/json"
# Settings a pool consumer is created with when no one created it yet (docs/protocol.md).
ACK_WAIT_SECONDS = 30
DELIVERIES_MAX = 10
POOL_ACK_PENDING_MAX = 20_000
# Heartbeat well inside ack_wait so that JetStream never hands a task we work on to another
# worker: a third of the consumer's ack_wait (read from the consumer; this when it cannot be read).
HEARTBEAT_SECONDS = ACK_WAIT_SECONDS / 3
HEARTBEAT_SECONDS_MIN = 0.1
RESULT_REQUEST_TIMEOUT_SECONDS = 5
RESULT_RETRY_DELAY_SECONDS = 0.5
# After a task's deadline, keep trying to send its result this much longer before handing the
# task back (nak): the attempt times out by the coordinator's clock, in a turn of its shard, so a
# result a little past this worker's deadline may still be applied, and a later one is answered
# `applied: false` at no cost (the Rust SDK's REPORT_GRACE_MS).
RESULT_GRACE_MS = 30_000
# A task still running this long past its deadline is abandoned with `deadline_exceeded`
# (a grace for clock skew between hosts, as the Rust SDK's DEADLINE_GRACE).
DEADLINE_GRACE_MS = 1_000
# On SIGINT/SIGTERM, how long the running task may take to finish before it is handed back.
SHUTDOWN_GRACE_SECONDS = 30.0
# After the grace, how long to wait for the abandoned task to be handed back.
STOP_STEP_SECONDS = 2.0
PRIORITY_DEFAULT = 5
# How often to look for priority lanes that hold tasks, and how long to wait before looking
# at every lane again when the pool has several and none held a task.
LANE_SCAN_SECONDS = 1.0
LANES_IDLE_SECONDS = 0.05
# How long a `no_wait` pull without an expiry may take to be answered (the Rust SDK's
# FETCH_TIMEOUT): one that gets no answer while the connection is up was held by a lane at a
# bound of tasks out set since the lane was bound, whose pulls carry an expiry from then on.
PULL_ANSWER_SECONDS = 1.0
# How long a `no_wait` pull on a lane with a bound of tasks out below the default may stay
# at the server (docs/protocol.md, "Priority lanes"): at its bound with tasks waiting, the
# lane answers no such pull until a slot frees, so the pull carries an expiry there.
BOUNDED_LANE_PULL_EXPIRES_NS = 100_000_000
# Statuses that answer a `no_wait` pull on a lane that gave nothing: 404 no messages, 408 the
# pull's expiry passed, 409 e.g. the consumer's bound of waiting pulls. Any other (503: no
# consumer answers the pull) means the lane's consumer may be gone, and the lane is bound again.
LANE_EMPTY_STATUSES = ("404", "408", "409")
# A task's error message is cut to this many characters (a result must stay small).
ERROR_MESSAGE_CHARS_MAX = 2_000
# The largest output the `big` task makes (4 MiB): over a NATS server's default max_payload
# (1 MiB), for the tests of an output too large to send, and small enough that a worker asked
# for more does not run out of memory.
BIG_BYTES_MAX = 4 * 1024 * 1024
# How long to wait before trying again to bind a consumer at startup.
BIND_RETRY_SECONDS = 1.0
# nats-py's `max_reconnect_attempts` for reconnecting for good: a worker left with a closed
# connection after a long outage would only log errors.
RECONNECT_FOREVER = -1
# The exit status when the connection to NATS was closed under the worker.
EXIT_CONNECTION_CLOSED = 1

log = logging.getLogger("python-worker")

# Each task running, by attempt (a `Running`): a cancel notice stops it.
running = {}

# Why a task's work was cancelled (`Running.reason`). A cancel with no reason comes from outside
# (the worker's own task cancelled, e.g. by asyncio.run on Ctrl-C): it is not the run's.
CANCELLED_BY_RUN = "run"
CANCELLED_BY_STOP = "stop"
CANCELLED_BY_DEADLINE = "deadline"


class Running:
    """A task's work and, once it is cancelled on purpose, why."""

    def __init__(self, work):
        self.work = work
        self.reason = None

    def cancel(self, reason):
        if self.reason is None and not self.work.done():
            self.reason = reason
            self.work.cancel()


class TaskError(Exception):
    def __init__(self, code, message, retryable=True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


def tasks_stream_name(prefix):
    return prefix.upper().replace(".", "_").replace("-", "_") + "_TASKS"


def is_json(msg):
    headers = msg.headers or {}
    media_type = headers.get("Content-Type", "").split(";")[0]
    return media_type.strip().lower() == JSON_CONTENT_TYPE


def decode(data, json_encoded):
    return json.loads(data) if json_encoded else msgpack.unpackb(data, raw=False)


def encode(value, json_encoded):
    return json.dumps(value).encode() if json_encoded else msgpack.packb(value, use_bin_type=True)


def is_integer(value):
    """Whether `value` is an integer (a bool, which Python counts as one, is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def task_problem(task):
    """What makes a decoded task message no task this worker can run and answer (the fields
    of docs/protocol.md, "The task message", it reads), or None."""
    if not isinstance(task, dict):
        return f"the message is a {type(task).__name__}, not a map"
    attempt = task.get("attempt")
    if not isinstance(attempt, dict):
        return "`attempt` is missing or not a map"
    for field in ("run_id", "step"):
        if not isinstance(attempt.get(field), str):
            return f"`attempt.{field}` is missing or not a string"
    if not is_integer(attempt.get("attempt")):
        return "`attempt.attempt` is missing or not an integer"
    if attempt.get("item") is not None and not is_integer(attempt["item"]):
        return "`attempt.item` is not an integer"
    for field in ("task", "reply_to"):
        if not isinstance(task.get(field), str):
            return f"`{field}` is missing or not a string"
    if not is_integer(task.get("deadline_ms")):
        return "`deadline_ms` is missing or not an integer"
    return None


async def run_task(name, task_input, report=None, progress=None, attempt=1):
    if name == "echo":
        return task_input
    if name == "upper":
        if not isinstance(task_input, dict) or not isinstance(task_input.get("text"), str):
            raise TaskError("invalid_input", 'upper expects {"text": <string>}', retryable=False)
        return {"text": task_input["text"].upper()}
    if name == "big":
        if not isinstance(task_input, dict) or not is_integer(task_input.get("bytes")):
            raise TaskError("invalid_input", 'big expects {"bytes": <count>}', retryable=False)
        count = task_input["bytes"]
        if not 0 <= count <= BIG_BYTES_MAX:
            message = f"big makes from 0 to {BIG_BYTES_MAX} bytes, not {count}: ask for fewer"
            raise TaskError("invalid_input", message, retryable=False)
        return {"blob": "x" * count}
    if name == "double":
        if isinstance(task_input, (int, float)) and not isinstance(task_input, bool):
            return task_input * 2
        if isinstance(task_input, dict) and isinstance(task_input.get("value"), (int, float)):
            return {"value": task_input["value"] * 2}
        raise TaskError("invalid_input", 'double expects a number or {"value": <number>}', retryable=False)
    if name == "sleep":
        if not isinstance(task_input, dict) or not isinstance(task_input.get("ms"), int):
            raise TaskError("invalid_input", 'sleep expects {"ms": <integer>}', retryable=False)
        await asyncio.sleep(task_input["ms"] / 1000)
        return task_input
    if name == "steps":
        start = (progress or {}).get("done", 0)
        for done in range(start + 1, task_input["to"] + 1):
            await asyncio.sleep(0.1)
            await report({"done": done})
            if attempt == 1 and done == task_input.get("fail_at"):
                raise TaskError("crashed", f"failed on purpose after step {done}")
        return {"from": start, "done": task_input["to"]}
    raise TaskError("unknown_task", f"this worker does not know task {name!r}", retryable=False)


def heartbeat_period(ack_wait_seconds):
    """A third of the consumer's ack_wait, so that two heartbeats may be lost."""
    if not ack_wait_seconds:
        return HEARTBEAT_SECONDS
    return max(ack_wait_seconds / 3, HEARTBEAT_SECONDS_MIN)


def gives_up(now_ms, deadline_ms):
    """True once a result that no coordinator confirmed is to be handed back (nak)."""
    return now_ms >= deadline_ms + RESULT_GRACE_MS


def handler_budget(deadline_ms, now_ms):
    """Seconds the task may still run: to its deadline plus DEADLINE_GRACE_MS (at least 0)."""
    return max(deadline_ms + DEADLINE_GRACE_MS - now_ms, 0) / 1000


def deadline_exceeded(task):
    message = "the task ran past its deadline and was abandoned by the worker"
    return {"attempt": task["attempt"], "error": {"code": "deadline_exceeded", "message": message, "retryable": True}}


async def heartbeat(msg, every=HEARTBEAT_SECONDS):
    """Tells JetStream we are still working (an in-progress ack) until cancelled."""
    while True:
        await asyncio.sleep(every)
        try:
            await msg.in_progress()
        except Exception as error:  # the connection may be reconnecting; keep trying
            log.warning("heartbeat failed: %s", error)


def cannot_encode(task, error):
    """The error result that replaces an output that cannot be encoded (e.g. an integer over
    MessagePack's 64 bits), so the step fails at once rather than by its timeout."""
    message = f"output cannot be encoded: {error!r}"[:ERROR_MESSAGE_CHARS_MAX]
    return {"attempt": task["attempt"], "error": {"code": "invalid_output", "message": message, "retryable": False}}


def too_large(task, why):
    """The error result that replaces an output too large to send (docs/protocol.md)."""
    message = f"the task's output is too large to send: {why}"[:ERROR_MESSAGE_CHARS_MAX]
    return {"attempt": task["attempt"], "error": {"code": "payload_too_large", "message": message, "retryable": False}}


async def send_result(nc, task, result, json_encoded):
    """Sends the result until the coordinator acknowledges it; False when no coordinator
    confirmed it by the task's deadline plus RESULT_GRACE_MS (then the task is handed back:
    a coordinator that took the shard over still applies a result past the deadline before
    its first turn, so giving up at the deadline could lose a finished task). An output
    too large to send (refused by NATS or by the coordinator) is replaced by a
    `payload_too_large` error result, and one that cannot be encoded by an `invalid_output`
    error result, so the step fails at once rather than by its timeout."""
    headers = {"Content-Type": JSON_CONTENT_TYPE} if json_encoded else None
    try:
        payload = encode(result, json_encoded)
    except (OverflowError, TypeError, ValueError) as error:
        log.error("result for %s cannot be encoded: %r", task["attempt"], error)
        result = cannot_encode(task, error)
        payload = encode(result, json_encoded)
    while True:
        try:
            reply = await nc.request(task["reply_to"], payload, timeout=RESULT_REQUEST_TIMEOUT_SECONDS, headers=headers)
            answer = decode(reply.data, is_json(reply))
            if "ok" in answer:
                if not answer["ok"].get("applied", False):
                    log.info("result for %s was not applied (duplicate or late)", task["attempt"])
                return True
            error = answer.get("error", {})
            if error.get("code") == "payload_too_large" and "output" in result:
                log.error("result for %s too large: %s", task["attempt"], error.get("message"))
                result = too_large(task, error.get("message"))
                payload = encode(result, json_encoded)
                continue
            if not error.get("retryable", False):
                log.error("result for %s refused: %s", task["attempt"], error)
                return True
            log.warning("result for %s refused for now: %s", task["attempt"], error.get("code"))
        except MaxPayloadError as error:
            if "output" not in result:
                log.error("result for %s cannot be sent: %r", task["attempt"], error)
                return True
            log.error("result for %s over the server's max_payload: %r", task["attempt"], error)
            result = too_large(task, f"{len(payload)} bytes, over the NATS server's max_payload")
            payload = encode(result, json_encoded)
            continue
        except (NatsTimeoutError, NoRespondersError) as error:
            log.warning("no answer for the result of %s: %r", task["attempt"], error)
        except Exception as error:  # the connection may be reconnecting; keep trying
            log.warning("result of %s not sent: %r", task["attempt"], error)
        if gives_up(time.time() * 1000, task["deadline_ms"]):
            log.warning("no coordinator confirmed the result of %s in time; handing the task back", task["attempt"])
            return False
        await asyncio.sleep(RESULT_RETRY_DELAY_SECONDS)


async def handle(nc, msg, heartbeat_every=HEARTBEAT_SECONDS):
    json_encoded = is_json(msg)
    try:
        task = decode(msg.data, json_encoded)
    except Exception as error:
        log.error("undecodable task message, terminating it: %s", error)
        await msg.term()
        return
    problem = task_problem(task)
    if problem is not None:
        # A poison message must not loop: the coordinator's attempt timeout fails the attempt.
        log.error("malformed task message, terminating it: %s", problem)
        await msg.term()
        return
    if time.time() * 1000 > task["deadline_ms"]:
        log.info("task %s is past its deadline, dropping it", task["attempt"])
        await msg.ack()
        return
    key = attempt_key(task["attempt"])

    async def report(details):
        """Tells the coordinator how far the attempt got (a progress report: a result with
        `progress` instead of `output` or `error`); a failed report only loses the report."""
        headers = {"Content-Type": JSON_CONTENT_TYPE} if json_encoded else None
        payload = encode({"attempt": task["attempt"], "progress": details}, json_encoded)
        try:
            await nc.request(task["reply_to"], payload, timeout=RESULT_REQUEST_TIMEOUT_SECONDS, headers=headers)
        except (NatsTimeoutError, NoRespondersError, MaxPayloadError) as error:
            log.warning("progress report of %s not confirmed: %r", task["attempt"], error)

    attempt = task["attempt"]["attempt"]
    overrun = beating = None
    try:
        # Heartbeats until the finally below, whatever happens in between.
        beating = asyncio.create_task(heartbeat(msg, heartbeat_every))
        work = asyncio.create_task(run_task(task["task"], task.get("input"), report, task.get("progress"), attempt))
        entry = Running(work)
        running[key] = entry
        # Abandoned a little past its deadline, as the coordinator has timed the attempt out by then.
        overrun = asyncio.get_running_loop().call_later(
            handler_budget(task["deadline_ms"], time.time() * 1000), entry.cancel, CANCELLED_BY_DEADLINE
        )
        try:
            output = await work
            result = {"attempt": task["attempt"], "output": output}
        except asyncio.CancelledError:
            # Only a cancel notice (marked by `on_notice`) is the run's: a cancel from outside
            # (in Python 3.11 the cancel of the task awaiting `work` reaches `work` too) or the
            # worker's stop hands the task back for another worker to run.
            if entry.reason == CANCELLED_BY_RUN:
                log.info("task %s cancelled by its run; acking it without a result", task["attempt"])
                await msg.ack()
                return
            if entry.reason == CANCELLED_BY_DEADLINE:
                log.warning("task %s ran past its deadline; abandoned", task["attempt"])
                result = deadline_exceeded(task)
            else:
                log.info("worker stopping; task %s handed back", task["attempt"])
                await nak(msg)
                if entry.reason is None:
                    raise
                return
        except TaskError as error:
            result = {
                "attempt": task["attempt"],
                "error": {"code": error.code, "message": error.message, "retryable": error.retryable},
            }
        except Exception as error:  # a bug in a task is an error result, not a lost task
            message = repr(error)[:ERROR_MESSAGE_CHARS_MAX]
            result = {"attempt": task["attempt"], "error": {"code": "worker_error", "message": message}}
        overrun.cancel()
        confirmed = await send_result(nc, task, result, json_encoded)
    finally:
        if overrun is not None:
            overrun.cancel()
        running.pop(key, None)
        if beating is not None:
            beating.cancel()
    if not confirmed:
        # No coordinator took the result: delivered again, a new attempt carries the task on.
        await nak(msg)
        return
    # The coordinator has the result durably (or the attempt is over): now the task may go.
    await msg.ack()


async def nak(msg):
    """Hands the task back to JetStream at once; best effort (unsettled, it comes back after ack_wait)."""
    try:
        await msg.nak()
    except Exception as error:
        log.warning("cannot hand the task back: %r", error)


def attempt_key(attempt):
    return (attempt["run_id"], attempt["step"], attempt.get("item"), attempt["attempt"])


async def listen_for_cancels(nc, prefix, pool):
    """Stops the tasks the coordinators say are no longer needed (their run was cancelled,
    failed or timed out). Advisory: a task that is not stopped runs to its end, and its
    result is answered `applied: false`."""

    async def on_notice(msg):
        try:
            notice = decode(msg.data, is_json(msg))
        except Exception as error:
            log.warning("malformed notice of cancelled tasks ignored: %s", error)
            return
        for attempt in notice.get("attempts", []):
            entry = running.get(attempt_key(attempt))
            if entry is not None:
                entry.cancel(CANCELLED_BY_RUN)

    await nc.subscribe(f"{prefix}.cancels.{pool}", cb=on_notice)


async def pause(seconds, stopping=None):
    """Sleeps `seconds`, or less once `stopping` (an asyncio.Event) is set."""
    if stopping is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class Lane:
    """A bound lane of the pool: its pull subscription, its consumer's name, whether its
    pulls carry an expiry (`bounded`) and how often its tasks are heartbeated (a third of its
    consumer's ack_wait)."""

    def __init__(self, subscription, durable, bounded, heartbeat_every=HEARTBEAT_SECONDS):
        self.subscription = subscription
        self.durable = durable
        self.bounded = bounded
        self.heartbeat_every = heartbeat_every


class LanePullFailed(Exception):
    """A lane's `no_wait` pull was answered with a status other than "nothing now"
    (LANE_EMPTY_STATUSES): its consumer may be gone."""

    def __init__(self, status, description):
        # On one line: nats-py may leave a line break in a status's description.
        super().__init__(" ".join(f"status {status} {description or ''}".split()))
        self.status = status


def lane_durable(pool, priority):
    """The name of the consumer of `pool`'s lane of `priority` (docs/protocol.md)."""
    return f"pool-{pool}" if priority == PRIORITY_DEFAULT else f"pool{priority}-{pool}"


def lane_subject(prefix, pool, priority):
    """The subject of `pool`'s lane of `priority` (docs/protocol.md)."""
    return f"{prefix}.tasks.{pool}" if priority == PRIORITY_DEFAULT else f"{prefix}.tasks.{pool}.p{priority}"


def pool_consumer_config():
    """The settings a pool consumer is created with when no one created it yet
    (docs/protocol.md, "Pool consumer settings")."""
    return api.ConsumerConfig(
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_SECONDS,
        max_deliver=DELIVERIES_MAX,
        max_ack_pending=POOL_ACK_PENDING_MAX,
    )


async def lane_consumer_config(js, prefix, pool):
    """The settings a lane consumer gets if this worker creates it: the pool consumer
    `pool-<pool>`'s, its max_ack_pending (`flowgrid pool limit`) and ack_wait (which the
    lane's heartbeats follow) copied, as the Rust SDK does (docs/protocol.md, "Priority
    lanes"); the defaults when the pool consumer does not exist."""
    config = pool_consumer_config()
    try:
        info = await js.consumer_info(tasks_stream_name(prefix), lane_durable(pool, PRIORITY_DEFAULT))
    except NotFoundError:
        return config
    if info.config.max_ack_pending is not None:
        config.max_ack_pending = info.config.max_ack_pending
    if info.config.ack_wait is not None:
        config.ack_wait = info.config.ack_wait
    return config


async def subscribe(js, prefix, pool, subject=None, durable=None, patient=True, stopping=None, config=None):
    """Binds (creating it if need be, with `config`, by default the pool consumer's settings)
    a consumer of the pool's tasks; `patient`: retries any error (at startup), else only a
    stream not there yet. None once `stopping` is set: a worker told to stop while no
    coordinator has made the stream yet (or the prefix is wrong) exits instead of retrying
    for good."""
    stream = tasks_stream_name(prefix)
    subject = subject or f"{prefix}.tasks.{pool}"
    durable = durable or f"pool-{pool}"
    config = config or pool_consumer_config()
    while stopping is None or not stopping.is_set():
        try:
            return await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        except NotFoundError:
            log.info("stream %s does not exist yet (is a coordinator running? is --prefix right?); retrying", stream)
            await pause(BIND_RETRY_SECONDS, stopping)
        except Exception as error:  # NATS reconnecting, a JetStream timeout or 503
            if not patient:
                raise
            log.warning("cannot bind consumer %s now: %r; retrying", durable, error)
            await pause(BIND_RETRY_SECONDS, stopping)
    return None


async def bind_lane(js, prefix, pool, priority, patient=False, stopping=None):
    """Binds `pool`'s lane of `priority` (creating its consumer if need be: a lane's with the
    pool consumer's settings); None once `stopping` is set (see `subscribe`)."""
    config = None if priority == PRIORITY_DEFAULT else await lane_consumer_config(js, prefix, pool)
    durable = lane_durable(pool, priority)
    subject = lane_subject(prefix, pool, priority)
    subscription = await subscribe(js, prefix, pool, subject, durable, patient, stopping, config)
    if subscription is None:
        return None
    bounded, heartbeat_every = await consumer_settings(subscription)
    return Lane(subscription, durable, bounded, heartbeat_every)


async def rebind_lane(js, prefix, pool, lanes, priority, why, stopping=None):
    """Binds lane `priority` again after its pull failed (`why`): its consumer may be gone
    (deleted, or lost with the server's data), and binding creates it as at startup
    (docs/protocol.md, "Priority lanes"); the other lanes stay. True once bound (the old
    subscription dropped); False, logged, when it cannot be bound now (the lane is tried
    again at its next failed pull)."""
    old = lanes[priority]
    log.warning("pull on pool lane %s failed (%s); binding it again", old.durable, why)
    try:
        lane = await bind_lane(js, prefix, pool, priority, stopping=stopping)
    except Exception as error:  # JetStream still unavailable: after a pause, the pull fails again
        log.warning("cannot bind pool lane %s now: %r", old.durable, error)
        return False
    if lane is None:  # the worker stops
        return False
    lanes[priority] = lane
    try:
        await old.subscription.unsubscribe()
    except Exception as error:
        log.warning("cannot drop the old subscription of pool lane %s: %r", old.durable, error)
    log.info("pool lane %s bound again", lane.durable)
    return True


async def scan_lanes(js, prefix, pool, lanes):
    """`find_lanes`, surviving a JetStream error (a timeout or a 503 while NATS reconnects or
    elects a leader): logged, and the next scan tries again."""
    try:
        await find_lanes(js, prefix, pool, lanes)
    except Exception as error:
        log.warning("cannot look for pool %s's priority lanes now (retrying at the next scan): %r", pool, error)


async def find_lanes(js, prefix, pool, lanes):
    """Binds the pool's priority lanes that hold tasks and are not bound yet."""
    info = await js.stream_info(tasks_stream_name(prefix), subjects_filter=f"{prefix}.tasks.{pool}.>")
    for subject, count in (info.state.subjects or {}).items():
        lane = subject.rsplit(".", 1)[-1]
        if not count or not (len(lane) == 2 and lane[0] == "p" and lane[1].isdigit()):
            continue
        priority = int(lane[1])
        if priority not in lanes:
            lanes[priority] = await bind_lane(js, prefix, pool, priority)
            log.info("pulling pool %s's tasks of priority %d too", pool, priority)


async def consumer_settings(subscription):
    """What the worker takes from the consumer behind `subscription`: whether it has a bound
    of tasks out below the default (`flowgrid pool limit`), and the heartbeat period of its
    ack_wait. Unknown counts as bounded, whose pulls only cost an expiry, with the default
    heartbeat."""
    try:
        config = (await subscription.consumer_info()).config
    except Exception as error:
        log.warning("cannot read the consumer's bound of tasks out and ack_wait: %r", error)
        return True, HEARTBEAT_SECONDS
    return config.max_ack_pending < POOL_ACK_PENDING_MAX, heartbeat_period(config.ack_wait)


class Pulls:
    """This worker's subscription to the inbox the answers to its lane pulls come to (one
    pull at a time)."""

    def __init__(self, nc):
        self.nc = nc
        self.subscription = None

    async def renew(self):
        """Listens on a new inbox, and no more on the one before: the server drops a pull
        left waiting there (held by a lane at its bound) once no one listens on its reply
        subject, rather than answering it later, where the answer would be read as the
        answer to another pull."""
        old, self.subscription = self.subscription, await self.nc.subscribe(self.nc.new_inbox())
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception as error:
                log.warning("cannot stop listening on the inbox of a pull that got no answer: %r", error)


async def pull_no_wait(nc, pulls, prefix, durable, bounded):
    """The lane's next task if it holds one now, else None: a pull with `no_wait`, which
    the server answers at once (docs/protocol.md), so no pull is left open to take a task
    this worker would not look at until its next turn on the lane; on a `bounded` lane with
    an expiry too, since one at its bound holds the pull until a slot frees. `pulls` is a
    `Pulls`. Raises NatsTimeoutError when no answer comes in time (PULL_ANSWER_SECONDS for a
    pull without an expiry), LanePullFailed when the answer is a status other than
    LANE_EMPTY_STATUSES."""
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{tasks_stream_name(prefix)}.{durable}"
    pull = {"batch": 1, "no_wait": True}
    if bounded:
        pull["expires"] = BOUNDED_LANE_PULL_EXPIRES_NS
    request = json.dumps(pull).encode()
    await nc.publish(subject, request, reply=pulls.subscription.subject)
    timeout = RESULT_REQUEST_TIMEOUT_SECONDS if bounded else PULL_ANSWER_SECONDS
    answer = await pulls.subscription.next_msg(timeout=timeout)
    status = (answer.headers or {}).get("Status")
    if not status:
        return answer
    if status in LANE_EMPTY_STATUSES:
        return None
    raise LanePullFailed(status, answer.headers.get("Description"))


async def next_messages(nc, js, pulls, prefix, pool, lanes, stopping=None):
    """The next task and the `Lane` it came from: with one lane, a pull that waits up to a
    second; with several, a `no_wait` pull on each, highest priority first. A lane whose
    pull gets no answer is passed over; while the connection is up, that lane is at a bound
    of tasks out set since it was bound, and its pulls carry an expiry from then on
    (docs/protocol.md, "Priority lanes"). A lane whose pull fails (its consumer may be gone)
    is bound again, creating its consumer, and the others still pulled. Raises
    NatsTimeoutError when no lane had a task."""
    if len(lanes) == 1:
        lane = lanes[PRIORITY_DEFAULT]
        try:
            return lane, await lane.subscription.fetch(1, timeout=LANE_SCAN_SECONDS)
        except (ServiceUnavailableError, NotFoundError) as error:
            if not await rebind_lane(js, prefix, pool, lanes, PRIORITY_DEFAULT, repr(error), stopping):
                await pause(LANE_SCAN_SECONDS, stopping)
            raise NatsTimeoutError from error
    unbound = False
    for priority in sorted(lanes, reverse=True):
        lane = lanes[priority]
        try:
            msg = await pull_no_wait(nc, pulls, prefix, lane.durable, lane.bounded)
        except NatsTimeoutError:
            await pulls.renew()
            if not lane.bounded and nc.is_connected:
                log.info(
                    "pool lane %s is at a bound of tasks out set since it was bound; its pulls expire from now on",
                    lane.durable,
                )
                lane.bounded = True
            continue
        except LanePullFailed as error:
            unbound |= not await rebind_lane(js, prefix, pool, lanes, priority, str(error), stopping)
            continue
        if msg is not None:
            return lane, [msg]
    # A lane that cannot be bound now is tried again after a pause, not at once.
    await pause(LANE_SCAN_SECONDS if unbound else LANES_IDLE_SECONDS, stopping)
    raise NatsTimeoutError


async def keep_registered(js, prefix, pool, state):
    """Writes this worker's record in the workers bucket every 5 s, so `flowgrid workers`
    lists it (docs/protocol.md, "Worker records"); best effort."""
    bucket = prefix.upper().replace(".", "_").replace("-", "_") + "_WORKERS"
    try:
        kv = await js.key_value(bucket)
    except Exception as error:  # no bucket yet (no coordinator ran) or no permission
        log.info("not listed by `flowgrid workers`: %s", error)
        return
    host = socket.gethostname() or "localhost"
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in host)
    key = f"{pool}.{host}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    state["registry"] = (kv, key)
    started = int(time.time() * 1000)
    while True:
        record = {
            "id": key, "pool": pool, "host": host, "pid": os.getpid(), "concurrency": 1,
            "running": state["running"], "tasks_done": state["done"], "started_ms": started,
            "heartbeat_ms": int(time.time() * 1000), "sdk": "python nats-py",
        }
        try:
            await kv.put(key, msgpack.packb(record))
        except Exception as error:
            log.warning("cannot write this worker's record: %s", error)
        await asyncio.sleep(5)


async def finish(handling, msg, grace):
    """The worker is stopping: waits up to `grace` seconds for the task it runs, then hands
    it back (`nak`) so another worker runs it at once, not after ack_wait."""
    log.info("worker stopping; waiting up to %.1f s for the task it runs", grace)
    done, _ = await asyncio.wait([handling], timeout=grace)
    if done:
        return
    log.warning("the task still runs after the shutdown grace; handing it back")
    for entry in list(running.values()):
        entry.cancel(CANCELLED_BY_STOP)
    done, _ = await asyncio.wait([handling], timeout=STOP_STEP_SECONDS)
    if not done:  # e.g. still sending its result: hand it back all the same
        handling.cancel()
        await asyncio.wait([handling], timeout=STOP_STEP_SECONDS)
        await nak(msg)


async def connect(url, pool, stopping, connection):
    """Connects to NATS, trying for as long as it takes (and reconnecting for good later);
    None when `stopping` is set first. Should the connection be closed all the same (not by
    the worker's own close, which sets `connection["closing"]` first), `connection["closed"]`
    is set, and `stopping` too."""

    async def on_closed():
        if connection["closing"]:
            return
        connection["closed"] = True
        log.error("the connection to NATS is closed and will not come back; stopping")
        stopping.set()

    connecting = asyncio.create_task(
        nats.connect(
            url,
            name=f"python-worker-{pool}",
            max_reconnect_attempts=RECONNECT_FOREVER,
            closed_cb=on_closed,
        )
    )
    stop_waiter = asyncio.create_task(stopping.wait())
    await asyncio.wait([connecting, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
    stop_waiter.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    await asyncio.wait([connecting])
    return None


async def close(nc):
    """Drains the connection (the last acks and naks reach the server before it closes), or
    closes it when it is down."""
    if nc.is_connected:
        await nc.drain()
    elif not nc.is_closed:
        await nc.close()


async def serve(nc, args, stopping):
    """Serves the pool until `--max-tasks` tasks are handled or `stopping` is set; the number
    of tasks handled."""
    js = nc.jetstream()
    await listen_for_cancels(nc, args.prefix, args.pool)
    default_lane = await bind_lane(js, args.prefix, args.pool, PRIORITY_DEFAULT, patient=True, stopping=stopping)
    if default_lane is None:
        log.info("stopped before pool %s's consumer was bound", args.pool)
        return 0
    lanes = {PRIORITY_DEFAULT: default_lane}
    pulls = Pulls(nc)
    await pulls.renew()
    log.info(
        "serving pool %s on %s (heartbeat every %.1f s)", args.pool, args.nats_url, default_lane.heartbeat_every
    )
    done = 0
    state = {"running": 0, "done": 0}
    registry = asyncio.create_task(keep_registered(js, args.prefix, args.pool, state))
    stop_waiter = asyncio.create_task(stopping.wait())
    scanned = 0.0
    try:
        while (args.max_tasks == 0 or done < args.max_tasks) and not stopping.is_set():
            if time.monotonic() - scanned >= LANE_SCAN_SECONDS:
                scanned = time.monotonic()
                await scan_lanes(js, args.prefix, args.pool, lanes)
            try:
                lane, messages = await next_messages(nc, js, pulls, args.prefix, args.pool, lanes, stopping)
            except NatsTimeoutError:
                continue
            except Exception as error:  # NATS reconnecting, a JetStream 503: pull again shortly
                log.warning("cannot pull tasks now: %r", error)
                await pause(LANE_SCAN_SECONDS, stopping)
                continue
            for msg in messages:
                if stopping.is_set():
                    await nak(msg)  # taken as the worker stops: not started, handed back
                    continue
                state["running"] = 1
                # Heartbeats a third of the ack_wait of the lane's own consumer.
                handling = asyncio.create_task(handle(nc, msg, lane.heartbeat_every))
                await asyncio.wait([handling, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
                if not handling.done():
                    await finish(handling, msg, args.shutdown_grace)
                elif not handling.cancelled() and handling.exception() is not None:
                    log.error("task not handled: %r", handling.exception())
                state["running"] = 0
                done += 1
                state["done"] = done
    finally:
        stop_waiter.cancel()
        registry.cancel()
        # A stopped worker is listed no more (docs/protocol.md, "Worker records").
        if "registry" in state:
            kv, key = state["registry"]
            try:
                await kv.delete(key)
            except Exception as error:
                log.warning("cannot delete this worker's record: %s", error)
    return done


async def main(argv=None):
    """Runs the worker; its exit status: 0, or EXIT_CONNECTION_CLOSED."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--prefix", default="flowgrid")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--max-tasks", type=int, default=0, help="exit after this many tasks (0: never)")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=SHUTDOWN_GRACE_SECONDS,
        help="on SIGINT/SIGTERM, seconds the running task may take to finish before it is handed back",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    # Ctrl-C and SIGTERM stop the worker in order (docs/protocol.md, "Stopping") instead of
    # cancelling the main task (asyncio.run's Ctrl-C), which would reach the task it runs.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)

    connection = {"closing": False, "closed": False}
    nc = await connect(args.nats_url, args.pool, stopping, connection)
    if nc is None:
        log.info("stopped before connecting to NATS")
        return 0
    try:
        done = await serve(nc, args, stopping)
    finally:
        connection["closing"] = True
        await close(nc)
    if connection["closed"]:
        log.error(
            "handled %d tasks; exiting with status %d, the connection to NATS being closed: start the worker again",
            done,
            EXIT_CONNECTION_CLOSED,
        )
        return EXIT_CONNECTION_CLOSED
    log.info("handled %d tasks, exiting", done)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
