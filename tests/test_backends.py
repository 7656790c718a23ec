"""The proxy's own requests to an instance (status, kernels, uploads): an instance runs its user's
code and may answer anything, so what the proxy reads from it is bounded and never raises."""

import asyncio

import pytest

from backends import MAX_ANSWER
from backends import Instance
from backends import http_get
from backends import kernels_busy


@pytest.fixture
async def hostile():
    """A stand-in for a Jupyter whose user rewrote it: it answers whatever the test sets."""
    state = {"answer": b""}

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(state["answer"])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state["port"] = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()


async def test_an_answer_over_the_bound_is_no_answer(hostile):
    hostile["answer"] = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * (MAX_ANSWER + 1)
    assert await http_get("127.0.0.1", hostile["port"], "/api/status", 5) is None
    hostile["answer"] = b"HTTP/1.0 200 OK\r\n\r\n{}"
    assert await http_get("127.0.0.1", hostile["port"], "/api/status", 5) == (200, b"{}")


@pytest.mark.parametrize("body", [b"[" * 200_000, b"[1, 2]", b'{"a": 1}', b"\xff\xfe", b'[{"execution_state": []}]'])
async def test_kernels_busy_survives_any_answer(hostile, body):
    hostile["answer"] = b"HTTP/1.0 200 OK\r\n\r\n" + body
    instance = Instance("i" * 32, "docker", "c", "127.0.0.1", hostile["port"], "", 0.0, "t")
    assert await kernels_busy(instance) is False
