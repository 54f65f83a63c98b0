#!/usr/bin/env python3
"""Unit tests of client.py, with a fake NATS connection (no server).

Run by the e2e test `python::python_worker_unit_tests`, or by hand:

    .grid/venv/bin/python -m unittest -v tests/python_worker/test_client.py
"""

import asyncio
import contextlib
import io
import json
import os
import sys
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import client  # noqa: E402
from nats.errors import TimeoutError as NatsTimeoutError  # noqa: E402


class FakeReply:
    def __init__(self, body):
        self.data = json.dumps(body).encode()


class LosesFirstStartReply:
    """A connection that records each `run.start` body: the first one's reply is lost (a
    timeout), the next ones are answered with the run they start."""

    def __init__(self):
        self.starts = []

    async def request(self, subject, payload, timeout=None, headers=None):
        assert subject == "flowgrid.api.run.start", subject
        self.starts.append(json.loads(payload))
        if len(self.starts) == 1:
            raise NatsTimeoutError
        return FakeReply({"ok": {"run_id": "run-1", "flow": "chain", "version": 1, "created": False}})

    async def close(self):
        pass


class Start(unittest.TestCase):
    def start(self, *more):
        nc = LosesFirstStartReply()

        async def connect(*args, **kwargs):
            return nc

        with mock.patch.object(client.nats, "connect", connect), contextlib.redirect_stdout(io.StringIO()):
            with contextlib.redirect_stderr(io.StringIO()):
                status = asyncio.run(client.main(["--flow", "chain", *more]))
        self.assertEqual(status, 0)
        return nc.starts

    def test_a_start_retried_after_a_lost_reply_carries_the_same_key(self):
        # Without a key, the retry of a start whose reply was lost would start a second run.
        first, retry = self.start()
        self.assertTrue(first.get("idempotency_key"), f"a start without an idempotency key: {first}")
        self.assertEqual(retry, first)

    def test_the_given_key_is_the_one_sent(self):
        first, retry = self.start("--idempotency-key", "order-1")
        self.assertEqual(first["idempotency_key"], "order-1")
        self.assertEqual(retry, first)

    def test_an_input_that_is_not_json_is_a_usage_error_and_sends_nothing(self):
        nc = LosesFirstStartReply()

        async def connect(*args, **kwargs):
            return nc

        stderr = io.StringIO()
        with mock.patch.object(client.nats, "connect", connect), contextlib.redirect_stderr(stderr):
            with self.assertRaises(SystemExit) as exited:
                asyncio.run(client.main(["--flow", "chain", "--input", "{n: 1"]))
        self.assertEqual(exited.exception.code, 2)
        self.assertIn("--input is not JSON", stderr.getvalue())
        self.assertEqual(nc.starts, [])


if __name__ == "__main__":
    unittest.main()
