"""answers.py: what a handler raises becomes the flow's JSON answer, and a refused body is drained."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow
from mitmproxy.test import tutils
from redis.exceptions import ConnectionError as RedisConnectionError

from answers import answering_errors
from backends import ImageMissing
from errors import ApiError
from marks import DEFERRED
from marks import SINK


def body_flow(content: bytes = b"x" * 100):
    req = tutils.treq(method=b"POST", path=b"/somewhere", content=content)
    req.headers["Content-Length"] = str(len(content))
    return tflow.tflow(req=req, resp=False)


def raising(error: BaseException):
    async def handler(flow) -> None:
        raise error

    return handler


def named(where: str):
    """How the tests name their request in a backend fault's log line."""
    return lambda flow: where


@pytest.mark.parametrize(
    "error, status, code",
    [
        (ApiError(403, "NO_SESSION", "no"), 403, "NO_SESSION"),
        (ImageMissing("no image"), 503, "IMAGE_MISSING"),
        (RedisConnectionError("gone"), 503, "REDIS_UNAVAILABLE"),
    ],
)
async def test_refusals_and_faults_become_json_answers(error, status, code):
    flow = body_flow()
    await answering_errors(flow, raising(error), named("POST /somewhere"))
    assert flow.response.status_code == status
    assert json.loads(flow.response.content)["code"] == code


async def test_anything_else_is_a_500_only_when_asked_and_goes_on_up_otherwise():
    flow = body_flow()
    await answering_errors(flow, raising(RuntimeError("bug")), named("POST /somewhere"), unexpected=True)
    assert flow.response.status_code == 500 and json.loads(flow.response.content)["code"] == "INTERNAL"
    with pytest.raises(RuntimeError):
        await answering_errors(body_flow(), raising(RuntimeError("bug")), named("routing /somewhere"))


async def test_a_refused_body_goes_to_the_drain_unread_and_an_answered_one_is_left_alone(sink):
    flow = body_flow()
    await answering_errors(flow, raising(ApiError(403, "NO_SESSION", "no")), named("routing /x"), drain=sink)
    assert flow.response is None and flow.metadata[DEFERRED] and flow.metadata[SINK]

    async def routed(flow) -> None:
        pass

    quiet = body_flow()
    await answering_errors(quiet, routed, named("routing /x"), drain=sink)
    assert quiet.response is None and SINK not in quiet.metadata


async def test_finish_sees_the_answer_before_it_is_deferred(sink):
    flow = body_flow()
    seen = []
    await answering_errors(
        flow,
        raising(ApiError(404, "NOT_FOUND", "no")),
        named("GET /x"),
        drain=sink,
        finish=lambda f: seen.append(f.response.status_code),
    )
    assert seen == [404] and flow.metadata[DEFERRED]
