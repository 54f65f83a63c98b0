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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import worker  # noqa: E402
from nats.errors import NoRespondersError  # noqa: E402

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


if __name__ == "__main__":
    unittest.main()
