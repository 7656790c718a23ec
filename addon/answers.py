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
    except ApiError as e:
        flow.response = e.response()
    except BackendError as e:
        flow.response = errors.backend_failure(e, where(flow)).response()
    except RedisError as e:
        flow.response = errors.redis_unavailable(e).response()
    except Exception:
        if not unexpected:
            raise
        log.exception("datalab: unexpected failure on %s", inputs.shown(flow.request.path))
        flow.response = ApiError(500, "INTERNAL", "the proxy failed unexpectedly; see its log").response()
    if finish is not None:
        finish(flow)
    if drain is not None:
        refuse(flow, drain)


def refuse(flow: http.HTTPFlow, drain: UploadSink, error: ApiError | None = None) -> None:
    """The refused-body drain: the flow's answer (or `error`'s, set now) is final, and a body on its
    way goes to `drain` unread (UploadSink.refuse says how)."""
    if error is not None:
        flow.response = error.response()
    drain.refuse(flow)
