"""Where a hook's refusals become answers: the one `answering_errors` (the api's endpoints, the
router) and the one refused-body drain (`refuse`, the guards' too).

A refusal, a backend fault or a Redis fault raised under a hook becomes the flow's JSON answer
(errors.py gives its shape, and counts it). A refusal given in `requestheaders` is final before the
body is read: a body on its way goes to the upload sink unread (upload.py), never into memory.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from collections.abc import Callable

from mitmproxy import http
from redis.exceptions import RedisError

import errors
import inputs
from backends import BackendError
from errors import ApiError
from upload import UploadSink

log = logging.getLogger(__name__)


async def answering_errors(
    flow: http.HTTPFlow,
    handler: Callable[[http.HTTPFlow], Awaitable[None]],
    where: Callable[[http.HTTPFlow], str],
    *,
    drain: UploadSink | None = None,
    unexpected: bool = False,
    finish: Callable[[http.HTTPFlow], None] | None = None,
) -> None:
    """Run `handler`; the ApiError, BackendError or RedisError it raises becomes the flow's answer
    (a backend's own words are logged with what `where` names the
    request, worked out only then: not on every request). With `unexpected`, anything else is a 500
    INTERNAL (logged); without, it goes on up (mitmproxy logs it, and FailClosed answers). `finish`
    then sees the answer; with `drain` (a hook that runs before the body is read), a refused
    request's body goes to the drain."""
    try:
        await handler(flow)
    except Exception as e:
        refusal = as_refusal(e, flow, where)
        if refusal is None:
            if not unexpected:
                raise
            refusal = unexpected_failure(flow)
        flow.response = refusal.response()
    if finish is not None:
        finish(flow)
    if drain is not None:
        refuse(flow, drain)


def as_refusal(e: Exception, flow: http.HTTPFlow, where: Callable[[http.HTTPFlow], str]) -> ApiError | None:
    """The refusal an ApiError, BackendError or RedisError raised under a hook is; None for anything else."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, BackendError):
        return errors.backend_failure(e, where(flow))
    if isinstance(e, RedisError):
        return errors.redis_unavailable(e)
    return None


def unexpected_failure(flow: http.HTTPFlow) -> ApiError:
    """A 500 INTERNAL for what no refusal covers (call it where the exception is handled: it is logged)."""
    log.exception("datalab: unexpected failure on %s", inputs.shown(flow.request.path))
    return ApiError(500, "INTERNAL", "the proxy failed unexpectedly; see its log")


def refuse(flow: http.HTTPFlow, drain: UploadSink, error: ApiError | None = None) -> None:
    """The refused-body drain: the flow's answer (or `error`'s, set now) is final, and a body on its
    way goes to `drain` unread (UploadSink.refuse says how)."""
    if error is not None:
        flow.response = error.response()
    drain.refuse(flow)
