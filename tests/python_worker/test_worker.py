#!/usr/bin/env python3
"""Unit tests of worker.py's rules, with fake NATS messages and connections (no server).

Run by the e2e test `python::python_worker_unit_tests`, or by hand:

    .grid/venv/bin/python -m unittest -v tests/python_worker/test_worker.py
"""

import argparse
import asyncio
import json
import os
import sys
import time
import unittest
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgpack  # noqa: E402
import worker  # noqa: E402
from nats.errors import ConnectionClosedError, NoRespondersError  # noqa: E402
from nats.errors import TimeoutError as NatsTimeoutError  # noqa: E402
from nats.js import api  # noqa: E402
from nats.js.errors import NotFoundError, ServiceUnavailableError  # noqa: E402

ATTEMPT = {"run_id": "run-1", "step": "s", "attempt": 1}


def now_ms():
    """The time in Unix ms, an integer as in a task's `deadline_ms`."""
    return int(time.time() * 1000)


class FakeMsg:
    """A task message (JSON, or MessagePack without a Content-Type) that records how it was
    settled."""

    def __init__(self, task, json_encoded=True):
        self.data = json.dumps(task).encode() if json_encoded else msgpack.packb(task)
        self.headers = {"Content-Type": "application/json"} if json_encoded else None
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
        body = json.loads(payload) if headers else msgpack.unpackb(payload)
        if "progress" in body:
            return FakeReply({"ok": {"applied": True}})
        if self.failures > 0:
            self.failures -= 1
            raise NoRespondersError
        self.results.append(body)
        return FakeReply({"ok": {"applied": True}})


def task(name, task_input, deadline_ms):
    return {"attempt": ATTEMPT, "task": name, "input": task_input, "deadline_ms": deadline_ms, "reply_to": "r"}


def other_tasks():
    """The asyncio tasks left running besides the current one (e.g. a heartbeat)."""
    return [other for other in asyncio.all_tasks() if other is not asyncio.current_task()]


class MalformedTasks(unittest.TestCase):
    def test_a_task_message_of_a_bad_shape_is_terminated_and_not_heartbeated(self):
        # Decoded, but no task this worker can run and answer: a poison message must not
        # loop (docs/protocol.md, the worker loop, 3), nor be heartbeated for good.
        good = task("echo", 1, now_ms() + 60_000)
        shapes = {
            "no attempt": {key: value for key, value in good.items() if key != "attempt"},
            "attempt a string": {**good, "attempt": "run-1"},
            "attempt.attempt missing": {**good, "attempt": {"run_id": "run-1", "step": "s"}},
            "item a list": {**good, "attempt": {**ATTEMPT, "item": [1]}},
            "deadline_ms a string": {**good, "deadline_ms": "soon"},
            "no reply_to": {key: value for key, value in good.items() if key != "reply_to"},
            "task a number": {**good, "task": 7},
            "a list body": [good],
        }
        for shape, body in shapes.items():
            with self.subTest(shape):
                nc, msg = FakeNats(), FakeMsg(body)

                async def go():
                    await asyncio.wait_for(worker.handle(nc, msg), 5)
                    return other_tasks()

                with self.assertLogs("python-worker", "ERROR"):
                    left = asyncio.run(go())
                self.assertEqual(msg.settled, ["term"])
                self.assertEqual(left, [], "nothing (no heartbeat) goes on for a terminated message")
                self.assertEqual(nc.results, [])

    def test_a_map_items_task_is_run(self):
        nc, msg = FakeNats(), FakeMsg({**task("echo", 1, now_ms() + 60_000), "attempt": {**ATTEMPT, "item": 3}})
        asyncio.run(asyncio.wait_for(worker.handle(nc, msg), 5))
        self.assertEqual(msg.settled, ["ack"])
        self.assertEqual(nc.results, [{"attempt": {**ATTEMPT, "item": 3}, "output": 1}])


class UnencodableOutput(unittest.TestCase):
    def test_an_output_that_cannot_be_encoded_is_an_invalid_output_error_and_acked(self):
        # 2**63 fits MessagePack's unsigned 64 bits; its double does not.
        nc = FakeNats()
        msg = FakeMsg(task("double", {"value": 2**63}, now_ms() + 60_000), json_encoded=False)
        with self.assertLogs("python-worker", "ERROR"):
            asyncio.run(asyncio.wait_for(worker.handle(nc, msg), 5))
        self.assertEqual(msg.settled, ["ack"])
        [result] = nc.results
        self.assertEqual(result["attempt"], ATTEMPT)
        self.assertEqual((result["error"]["code"], result["error"]["retryable"]), ("invalid_output", False))
        self.assertIn("output cannot be encoded", result["error"]["message"])


class BigTask(unittest.TestCase):
    def test_big_makes_what_the_too_large_output_test_asks_and_refuses_more_than_its_bound(self):
        # The e2e test python_worker_fails_a_step_whose_output_is_too_large_at_once asks for 1.5 MiB.
        output = asyncio.run(worker.run_task("big", {"bytes": 1_572_864}))
        self.assertEqual(len(output["blob"]), 1_572_864)
        # In order, stopping at the first that is made: 20 GB must never be.
        for count in (worker.BIG_BYTES_MAX + 1, 20_000_000_000, -1):
            with self.assertRaises(worker.TaskError, msg=f"{count} bytes") as raised:
                asyncio.run(worker.run_task("big", {"bytes": count}))
            self.assertEqual((raised.exception.code, raised.exception.retryable), ("invalid_input", False))
            self.assertIn(str(worker.BIG_BYTES_MAX), raised.exception.message)


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


def consumer(ack_wait=worker.ACK_WAIT_SECONDS, max_ack_pending=worker.POOL_ACK_PENDING_MAX):
    """A consumer's settings as nats-py reads them (ack_wait in seconds)."""
    return api.ConsumerConfig(ack_wait=ack_wait, max_ack_pending=max_ack_pending)


class FakeJetStream:
    """The pool's consumers as the server holds them (`consumers`: settings by name) and its
    lane subjects with their message counts; `pull_subscribe` creates a missing consumer from
    `config` and binds it, as nats-py does."""

    def __init__(self, consumers, subjects=None):
        self.consumers = dict(consumers)
        self.subjects = subjects or {}

    async def consumer_info(self, stream, durable):
        if durable not in self.consumers:
            raise NotFoundError(code=404, description="consumer not found")
        return SimpleNamespace(config=self.consumers[durable])

    async def pull_subscribe(self, subject, durable=None, stream=None, config=None):
        if durable not in self.consumers:
            config.filter_subject, config.durable_name = subject, durable
            self.consumers[durable] = config
        return FakeLaneSubscription(self, durable)

    async def stream_info(self, name, subjects_filter=None):
        return SimpleNamespace(state=SimpleNamespace(subjects=self.subjects))

    async def key_value(self, bucket):
        raise NotFoundError(code=404, description="bucket not found")


class FakeLaneSubscription:
    """A pull subscription bound to consumer `durable` of a `FakeJetStream`: once the consumer
    is gone, no one answers its pulls (503), as with a real server."""

    def __init__(self, js, durable):
        self.js = js
        self.durable = durable
        self.unsubscribed = False

    async def consumer_info(self):
        return await self.js.consumer_info("FLOWGRID_TASKS", self.durable)

    async def fetch(self, batch, timeout=None):
        if self.durable not in self.js.consumers:
            raise ServiceUnavailableError
        raise NatsTimeoutError

    async def unsubscribe(self):
        self.unsubscribed = True


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


class NoResponders:
    """The server's answer to a pull no consumer takes (its consumer is gone)."""

    data = b""
    headers = {"Status": "503", "Description": "No Responders"}


class LaneNats:
    """A connection whose pulls are answered with a task by the lanes in `answering` only:
    the others hold them (a lane at a bound of tasks out); a pull on a consumer missing from
    `js` (a `FakeJetStream`) is answered 503. `jetstream()` is `js`."""

    def __init__(self, answering, connected=True, js=None):
        self.answering = answering
        self.is_connected = connected
        self.js = js
        self.inboxes = {}
        self.pulls = []

    def jetstream(self):
        return self.js

    def new_inbox(self):
        return f"_INBOX.{len(self.inboxes)}"

    async def subscribe(self, subject, cb=None):
        self.inboxes[subject] = FakeInbox(subject)
        return self.inboxes[subject]

    async def publish(self, subject, payload, reply=None):
        durable = subject.rsplit(".", 1)[-1]
        self.pulls.append((durable, json.loads(payload), reply))
        if self.js is not None and durable not in self.js.consumers:
            self.inboxes[reply].answers.append(NoResponders())
        elif durable in self.answering:
            self.inboxes[reply].answers.append(FakeMsg(task("echo", durable, now_ms() + 60_000)))


def quiet():
    """Silences the worker's log, for a test of what it does when told of a failure."""
    return mock.patch.object(worker.log, "disabled", True)


def lane(durable, bounded=False, js=None):
    """A bound lane; its subscription a `FakeLaneSubscription` of `js`, if given."""
    return worker.Lane(FakeLaneSubscription(js, durable) if js else None, durable, bounded)


class PriorityLanes(unittest.TestCase):
    def next_messages(self, nc, lanes, js=None):
        async def go():
            pulls = worker.Pulls(nc)
            await pulls.renew()
            return await worker.next_messages(nc, js, pulls, "flowgrid", "py", lanes)

        return asyncio.run(go())

    def test_a_lane_that_holds_its_pull_is_passed_over_and_marked_bounded(self):
        # Lane 8 got a bound of tasks out (`flowgrid pool limit`) after it was bound: it holds
        # a pull without an expiry. Lane 5 below it still gets its turn.
        nc = LaneNats(answering={"pool-py"})
        lanes = {8: lane("pool8-py"), 5: lane("pool-py")}
        pulled, [msg] = self.next_messages(nc, lanes)
        self.assertIs(pulled, lanes[5])
        self.assertEqual(json.loads(msg.data)["input"], "pool-py")
        self.assertTrue(lanes[8].bounded, "lane 8's pulls carry an expiry from now on")
        self.assertFalse(lanes[5].bounded)
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
        lanes = {8: lane("pool8-py"), 5: lane("pool-py")}
        with self.assertRaises(NatsTimeoutError):
            self.next_messages(nc, lanes)
        self.assertEqual([durable for durable, _, _ in nc.pulls], ["pool8-py", "pool-py"])
        self.assertFalse(lanes[8].bounded or lanes[5].bounded)

    def test_a_deleted_pool_consumer_is_created_again(self):
        # One lane: its pulls are answered 503 once `pool-py` is deleted.
        js = FakeJetStream(consumers={})
        lanes = {5: lane("pool-py", js=js)}
        old = lanes[5].subscription
        with quiet(), self.assertRaises(NatsTimeoutError):
            self.next_messages(LaneNats(answering=set()), lanes, js)
        created = js.consumers["pool-py"]
        self.assertEqual(created.filter_subject, "flowgrid.tasks.py")
        self.assertEqual(created.max_ack_pending, worker.POOL_ACK_PENDING_MAX)
        self.assertIsNot(lanes[5].subscription, old)
        self.assertTrue(old.unsubscribed)
        # Pulled again, the lane waits for a task rather than failing.
        with self.assertRaises(NatsTimeoutError):
            asyncio.run(lanes[5].subscription.fetch(1))

    def test_a_deleted_lane_consumer_is_created_again_and_the_other_lanes_still_pulled(self):
        limited = consumer(ack_wait=6, max_ack_pending=3)
        js = FakeJetStream(consumers={"pool-py": limited})
        nc = LaneNats(answering={"pool-py"}, js=js)
        lanes = {8: lane("pool8-py", js=js), 5: lane("pool-py", js=js)}
        old = lanes[8].subscription
        with quiet():
            pulled, [msg] = self.next_messages(nc, lanes, js)
        self.assertIs(pulled, lanes[5])
        self.assertEqual(json.loads(msg.data)["input"], "pool-py")
        created = js.consumers["pool8-py"]
        self.assertEqual(created.filter_subject, "flowgrid.tasks.py.p8")
        self.assertEqual((created.ack_wait, created.max_ack_pending), (6, 3), "the pool consumer's settings")
        self.assertIsNot(lanes[8].subscription, old)
        self.assertTrue(old.unsubscribed)

    def test_a_lane_consumer_the_worker_creates_copies_the_pool_consumers_settings(self):
        # `flowgrid pool limit py --max-in-flight 3` and an ack_wait of 6 s on the pool consumer.
        js = FakeJetStream(consumers={"pool-py": consumer(ack_wait=6, max_ack_pending=3)})
        js.subjects = {"flowgrid.tasks.py.p8": 2, "flowgrid.tasks.py.p2": 0}
        lanes = {}
        asyncio.run(worker.find_lanes(js, "flowgrid", "py", lanes))
        self.assertEqual(list(lanes), [8], "only the lane that holds tasks")
        created = js.consumers["pool8-py"]
        self.assertEqual(created.filter_subject, "flowgrid.tasks.py.p8")
        self.assertEqual((created.ack_wait, created.max_ack_pending), (6, 3))
        self.assertEqual(created.max_deliver, worker.DELIVERIES_MAX)
        self.assertTrue(lanes[8].bounded)
        self.assertEqual(lanes[8].heartbeat_every, 2)

    def test_a_lanes_tasks_are_heartbeated_by_its_own_consumers_ack_wait(self):
        # Lane 8's consumer has an ack_wait of 6 s, the pool consumer the default 30 s.
        js = FakeJetStream(
            consumers={"pool-py": consumer(), "pool8-py": consumer(ack_wait=6)},
            subjects={"flowgrid.tasks.py.p8": 1},
        )
        nc = LaneNats(answering={"pool8-py"}, js=js)
        handled = []

        async def handle(_nc, msg, heartbeat_every=worker.HEARTBEAT_SECONDS):
            handled.append((json.loads(msg.data)["input"], heartbeat_every))
            await msg.ack()

        args = argparse.Namespace(prefix="flowgrid", pool="py", max_tasks=1, shutdown_grace=1.0, nats_url="fake")
        with mock.patch.object(worker, "handle", handle):
            done = asyncio.run(asyncio.wait_for(worker.serve(nc, args, asyncio.Event()), 5))
        self.assertEqual(done, 1)
        self.assertEqual(handled, [("pool8-py", 2)], "a third of lane 8's ack_wait, not of the pool consumer's")


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
