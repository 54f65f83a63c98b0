#!/usr/bin/env python3
"""Unit tests of worker.py's rules, with fake NATS messages and connections (no server).

Run by the e2e test `python::python_worker_unit_tests`, or by hand:

    .grid/venv/bin/python -m unittest -v tests/python_worker/test_worker.py
"""

import asyncio
import json
import os
import sys
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import worker  # noqa: E402
from nats.errors import ConnectionClosedError, NoRespondersError  # noqa: E402
from nats.errors import TimeoutError as NatsTimeoutError  # noqa: E402

ATTEMPT = {"run_id": "run-1", "step": "s", "attempt": 1}


def now_ms():
    return time.time() * 1000


class FakeMsg:
    """A task message that records how it was settled."""

    def __init__(self, task):
        self.data = json.dumps(task).encode()
        self.headers = {"Content-Type": "application/json"}
        self.settled = []

    async def ack(self):
        self.settled.append("ack")

    async def nak(self):
        self.settled.append("nak")

    async def term(self):
        self.settled.append("term")

    async def in_progress(self):
        pass


class FakeReply:
    def __init__(self, body):
        self.data = json.dumps(body).encode()
        self.headers = {"Content-Type": "application/json"}


class FakeNats:
    """Answers result requests: "no responders" `failures` times, then `{"ok": ...}`."""

    def __init__(self, failures=0):
        self.failures = failures
        self.results = []

    async def request(self, subject, payload, timeout=None, headers=None):
        body = json.loads(payload)
        if "progress" in body:
            return FakeReply({"ok": {"applied": True}})
        if self.failures > 0:
            self.failures -= 1
            raise NoRespondersError
        self.results.append(body)
        return FakeReply({"ok": {"applied": True}})


def task(name, task_input, deadline_ms):
    return {"attempt": ATTEMPT, "task": name, "input": task_input, "deadline_ms": deadline_ms, "reply_to": "r"}


class ResultGrace(unittest.TestCase):
    def test_gives_up_only_30_s_past_the_deadline(self):
        self.assertFalse(worker.gives_up(1_000_000, 1_000_000 - 1))
        self.assertFalse(worker.gives_up(1_000_000 + 29_999, 1_000_000))
        self.assertTrue(worker.gives_up(1_000_000 + 30_000, 1_000_000))

    def test_a_result_past_the_deadline_is_still_sent_and_acked(self):
        # No coordinator answers at the deadline (one restarting): the attempt times out by
        # the coordinator's clock, so the worker keeps sending the result past its own.
        nc = FakeNats(failures=2)
        msg = FakeMsg(task("echo", {"a": 1}, now_ms() - 10_000))
        # Delivered (and started) before its deadline: only the result comes late.
        sent = asyncio.run(worker.send_result(nc, json.loads(msg.data), {"attempt": ATTEMPT, "output": 1}, True))
        self.assertTrue(sent)
        self.assertEqual(len(nc.results), 1)

    def test_a_result_no_one_confirms_within_the_grace_hands_the_task_back(self):
        nc = FakeNats(failures=1_000)
        msg = FakeMsg(task("echo", {"a": 1}, now_ms() - 31_000))
        sent = asyncio.run(worker.send_result(nc, json.loads(msg.data), {"attempt": ATTEMPT, "output": 1}, True))
        self.assertFalse(sent)


class Cancels(unittest.TestCase):
    def run_handle(self, msg, nc, while_running):
        """Runs `handle` and `while_running(handling)` once the task runs; returns the task."""

        async def go():
            handling = asyncio.create_task(worker.handle(nc, msg))
            while not worker.running:
                await asyncio.sleep(0.01)
            await while_running(handling)
            try:
                await asyncio.wait_for(handling, 5)
            except asyncio.CancelledError:
                pass
            return handling

        return asyncio.run(go())

    def test_a_cancel_notice_acks_without_a_result(self):
        nc, msg = FakeNats(), FakeMsg(task("sleep", {"ms": 60_000}, now_ms() + 60_000))

        async def notice(_handling):
            for entry in worker.running.values():
                entry.cancel(worker.CANCELLED_BY_RUN)

        self.run_handle(msg, nc, notice)
        self.assertEqual(msg.settled, ["ack"])
        self.assertEqual(nc.results, [])

    def test_a_cancel_from_outside_is_no_run_cancel_and_hands_the_task_back(self):
        # Ctrl-C under asyncio.run cancels the main task; in Python 3.11 the cancel reaches
        # the task's work too. That must not read as the run's cancel (an ack without a
        # result leaves the attempt stuck until its timeout).
        nc, msg = FakeNats(), FakeMsg(task("sleep", {"ms": 60_000}, now_ms() + 60_000))

        async def interrupt(handling):
            handling.cancel()

        handling = self.run_handle(msg, nc, interrupt)
        self.assertTrue(handling.cancelled())
        self.assertEqual(msg.settled, ["nak"])
        self.assertEqual(nc.results, [])

    def test_the_workers_stop_hands_the_task_back(self):
        nc, msg = FakeNats(), FakeMsg(task("sleep", {"ms": 60_000}, now_ms() + 60_000))

        async def stop(_handling):
            for entry in worker.running.values():
                entry.cancel(worker.CANCELLED_BY_STOP)

        self.run_handle(msg, nc, stop)
        self.assertEqual(msg.settled, ["nak"])
        self.assertEqual(nc.results, [])


class Deadline(unittest.TestCase):
    def test_a_task_past_its_deadline_is_abandoned_with_deadline_exceeded(self):
        nc, msg = FakeNats(), FakeMsg(task("sleep", {"ms": 60_000}, now_ms() + 200))
        started = time.monotonic()
        asyncio.run(asyncio.wait_for(worker.handle(nc, msg), 5))
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(msg.settled, ["ack"])
        [result] = nc.results
        self.assertEqual(result["error"]["code"], "deadline_exceeded")
        self.assertTrue(result["error"]["retryable"])

    def test_the_heartbeat_is_a_third_of_ack_wait(self):
        self.assertEqual(worker.heartbeat_period(30), 10)
        self.assertEqual(worker.heartbeat_period(6), 2)
        self.assertEqual(worker.heartbeat_period(None), worker.HEARTBEAT_SECONDS)


class LaneScan(unittest.TestCase):
    def test_a_jetstream_error_in_the_lane_scan_is_survived(self):
        class FailingJetStream:
            async def stream_info(self, *args, **kwargs):
                raise TimeoutError("nats: timeout")

        lanes = {}
        asyncio.run(worker.scan_lanes(FailingJetStream(), "flowgrid", "py", lanes))
        self.assertEqual(lanes, {})


class FakeInbox:
    """A subscription to a pull inbox: its answers are queued by `LaneNats.publish`; with
    none queued, `next_msg` raises as when its timeout has passed."""

    def __init__(self, subject):
        self.subject = subject
        self.answers = []
        self.timeouts = []
        self.unsubscribed = False

    async def next_msg(self, timeout=None):
        self.timeouts.append(timeout)
        if not self.answers:
            raise NatsTimeoutError
        return self.answers.pop(0)

    async def unsubscribe(self):
        self.unsubscribed = True


class LaneNats:
    """A connection whose pulls are answered with a task by the lanes in `answering` only:
    the others hold them (a lane at a bound of tasks out)."""

    def __init__(self, answering, connected=True):
        self.answering = answering
        self.is_connected = connected
        self.inboxes = {}
        self.pulls = []

    def new_inbox(self):
        return f"_INBOX.{len(self.inboxes)}"

    async def subscribe(self, subject, cb=None):
        self.inboxes[subject] = FakeInbox(subject)
        return self.inboxes[subject]

    async def publish(self, subject, payload, reply=None):
        durable = subject.rsplit(".", 1)[-1]
        self.pulls.append((durable, json.loads(payload), reply))
        if durable in self.answering:
            self.inboxes[reply].answers.append(FakeMsg(task("echo", durable, now_ms() + 60_000)))


class PriorityLanes(unittest.TestCase):
    def next_messages(self, nc, lanes):
        async def go():
            pulls = worker.Pulls(nc)
            await pulls.renew()
            return await worker.next_messages(nc, pulls, "flowgrid", lanes)

        return asyncio.run(go())

    def test_a_lane_that_holds_its_pull_is_passed_over_and_marked_bounded(self):
        # Lane 8 got a bound of tasks out (`flowgrid pool limit`) after it was bound: it holds
        # a pull without an expiry. Lane 5 below it still gets its turn.
        nc = LaneNats(answering={"pool-py"})
        lanes = {8: (None, "pool8-py", False), 5: (None, "pool-py", False)}
        [msg] = self.next_messages(nc, lanes)
        self.assertEqual(json.loads(msg.data)["input"], "pool-py")
        self.assertEqual(lanes[8], (None, "pool8-py", True), "lane 8's pulls carry an expiry from now on")
        self.assertEqual(lanes[5], (None, "pool-py", False))
        (held, held_pull, held_inbox), (_, _, next_inbox) = nc.pulls
        self.assertEqual(held, "pool8-py")
        self.assertNotIn("expires", held_pull)
        self.assertEqual(nc.inboxes[held_inbox].timeouts, [worker.PULL_ANSWER_SECONDS])
        # The held pull's inbox is listened on no more (the server drops the pull), so its
        # late answer cannot pass for the answer to lane 5's pull.
        self.assertTrue(nc.inboxes[held_inbox].unsubscribed)
        self.assertNotEqual(next_inbox, held_inbox)

    def test_a_lane_whose_pull_is_unanswered_with_the_connection_down_is_not_marked_bounded(self):
        nc = LaneNats(answering=set(), connected=False)
        lanes = {8: (None, "pool8-py", False), 5: (None, "pool-py", False)}
        with self.assertRaises(NatsTimeoutError):
            self.next_messages(nc, lanes)
        self.assertEqual([durable for durable, _, _ in nc.pulls], ["pool8-py", "pool-py"])
        self.assertFalse(lanes[8][2] or lanes[5][2])


class ClosingConnection:
    """A connection on which the first fetch of tasks finds the connection closed for good
    (as nats-py closes it once it stops reconnecting): it calls the `closed_cb` given to
    `connect`."""

    def __init__(self):
        self.options = None
        self.is_connected = True
        self.is_closed = False

    async def connect(self, *args, **kwargs):
        self.options = kwargs
        return self

    def jetstream(self):
        return self

    def new_inbox(self):
        return "_INBOX.0"

    async def subscribe(self, subject, cb=None):
        return FakeInbox(subject)

    async def pull_subscribe(self, subject, durable=None, stream=None, config=None):
        return self

    async def consumer_info(self):
        raise ConnectionClosedError

    async def stream_info(self, *args, **kwargs):
        raise ConnectionClosedError

    async def key_value(self, bucket):
        raise ConnectionClosedError

    async def fetch(self, batch, timeout=None):
        if not self.is_closed:
            self.is_connected, self.is_closed = False, True
            closed = self.options.get("closed_cb")
            if closed is not None:
                await closed()
        raise ConnectionClosedError

    async def drain(self):
        raise AssertionError("a closed connection cannot be drained")

    async def close(self):
        raise AssertionError("the connection is closed already")


class Connection(unittest.TestCase):
    def test_the_worker_reconnects_for_good_and_exits_non_zero_once_the_connection_is_closed(self):
        nc = ClosingConnection()

        async def run():
            # A bound on the wait: a worker that goes on with a closed connection never ends.
            try:
                return await asyncio.wait_for(worker.main(["--nats-url", "nats://fake:4222", "--pool", "py"]), 5)
            except asyncio.TimeoutError:
                return "still running"

        with mock.patch.object(worker.nats, "connect", nc.connect), self.assertLogs("python-worker", "INFO") as logs:
            status = asyncio.run(run())
        self.assertEqual(nc.options.get("max_reconnect_attempts"), -1, "it reconnects for as long as it takes")
        self.assertIn("closed_cb", nc.options)
        self.assertEqual(status, worker.EXIT_CONNECTION_CLOSED, "\n".join(logs.output))
        self.assertNotEqual(worker.EXIT_CONNECTION_CLOSED, 0)


if __name__ == "__main__":
    unittest.main()
