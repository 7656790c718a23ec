"""The proxy's own requests to an instance (status, kernels, terminals, uploads): an instance runs
its user's code and may answer anything, so what the proxy reads from it is bounded and never raises."""

import json

import pytest

from backends import Instance
from backends.instance_http import MAX_ANSWER
from backends.instance_http import http_get
from backends.jupyter import jupyter_activity
from backends.jupyter import utc_epoch
from helpers import answering


@pytest.fixture
async def hostile():
    """A stand-in for a Jupyter whose user rewrote it: it answers whatever the test sets."""
    state = {"answer": b"", "paths": {}}  # paths: an answer per path (without the query) instead

    async with answering(lambda path: state["paths"].get(path.partition("?")[0], state["answer"])) as port:
        state["port"] = port
        yield state


async def test_an_answer_over_the_bound_is_no_answer(hostile):
    hostile["answer"] = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * (MAX_ANSWER + 1)
    assert await http_get("127.0.0.1", hostile["port"], "/api/status", 5) is None
    hostile["answer"] = b"HTTP/1.0 200 OK\r\n\r\n{}"
    assert await http_get("127.0.0.1", hostile["port"], "/api/status", 5) == (200, b"{}")


def ok(body) -> bytes:
    return b"HTTP/1.0 200 OK\r\n\r\n" + (body if isinstance(body, bytes) else json.dumps(body).encode())


def stand_in(port: int) -> Instance:
    return Instance("i" * 32, "docker", "c", "127.0.0.1", port, "", 0.0, "t")


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000,
        b"[1, 2]",
        b'{"a": 1}',
        b"\xff\xfe",
        b'[{"execution_state": []}]',
        b'[{"last_activity": 1e300}, {"last_activity": "yesterday"}, {"last_activity": "' + b"9" * 5000 + b'"}]',
        b'[{"last_activity": "0001-01-01T00:00:00+01:00"}, {"last_activity": ["2025-01-01T00:00:00Z"]}]',
    ],
)
async def test_jupyter_activity_survives_any_answer(hostile, body):
    hostile["answer"] = ok(body)
    busy, last = await jupyter_activity(stand_in(hostile["port"]))
    assert busy is False and (last is None or last < 0)


async def test_no_answer_is_no_information(hostile):
    hostile["answer"] = b"HTTP/1.0 200 OK\r\n\r\n" + b" " * (MAX_ANSWER + 1)
    assert await jupyter_activity(stand_in(hostile["port"])) == (False, None)
    hostile["answer"] = b"HTTP/1.0 403 Forbidden\r\n\r\n[]"
    assert await jupyter_activity(stand_in(hostile["port"])) == (False, None)
    hostile["answer"] = b"garbage"
    assert await jupyter_activity(stand_in(hostile["port"]), timeout=1) == (False, None)


async def test_the_latest_kernel_or_terminal_time_and_whether_a_kernel_is_busy(hostile):
    kernels = [
        {"id": "k1", "last_activity": "2025-06-01T10:00:00.000000Z", "execution_state": "idle"},
        {"id": "k2", "last_activity": "2025-06-01T10:05:00.500000Z", "execution_state": "busy"},
    ]
    terminals = [{"name": "1", "last_activity": "2025-06-01T10:07:00+00:00"}]
    hostile["paths"] = {"/api/kernels": ok(kernels), "/api/terminals": ok(terminals)}
    assert await jupyter_activity(stand_in(hostile["port"])) == (True, utc_epoch("2025-06-01T10:07:00Z"))
    hostile["paths"] = {"/api/kernels": ok(kernels[:1]), "/api/terminals": b"HTTP/1.0 404 Not Found\r\n\r\n"}
    assert await jupyter_activity(stand_in(hostile["port"])) == (False, utc_epoch("2025-06-01T10:00:00Z"))


@pytest.mark.parametrize(
    "stamp, epoch",
    [
        ("2025-06-01T10:00:00Z", 1748772000.0),
        ("2025-06-01T10:00:00.250000Z", 1748772000.25),
        ("2025-06-01T10:00:00+00:00", 1748772000.0),
        ("2025-06-01T12:00:00+02:00", 1748772000.0),
        ("2025-06-01T10:00:00", 1748772000.0),  # no zone: Jupyter's times are UTC
        ("", None),
        ("now", None),
        (1748772000, None),
        (None, None),
    ],
)
def test_jupyter_times_are_utc(stamp, epoch):
    assert utc_epoch(stamp) == epoch
