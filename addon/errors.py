"""Every refusal under /datalab/ is JSON {"code", "message"} with a fitting status (and is counted:
datalab_refusals_total)."""

from __future__ import annotations

import json
import logging

from mitmproxy import http

import counters
from backends import BackendError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal or a fault that becomes one JSON response; raised anywhere below a hook."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> http.Response:
        """The answer to a client (counted once per answer made)."""
        counters.refused(self.code, self.status)
        return json_response(self.status, self.body(), self.headers)

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> http.Response:
    """A JSON reply that no cache keeps."""
    return http.Response.make(
        status,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
    )


def not_configured() -> ApiError:
    return ApiError(503, "NOT_CONFIGURED", "the proxy has no valid datalab_* options yet")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BAD_REQUEST", message)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)


def nonce_unknown() -> ApiError:
    return not_found("NONCE_UNKNOWN", "this nonce is unknown, expired or its instance ended; start a new instance")


class InstanceGone(ApiError):
    """410 for a session whose instance ended; `instance_id` names it (a navigation gets the ended page)."""

    def __init__(self, instance_id: str = ""):
        super().__init__(410, "INSTANCE_GONE", "the instance of this session has ended; start a new one")
        self.instance_id = instance_id


def instance_gone(instance_id: str = "") -> InstanceGone:
    return InstanceGone(instance_id)


def method_not_allowed(allowed: str) -> ApiError:
    return ApiError(405, "METHOD_NOT_ALLOWED", f"use {allowed} for this endpoint", {"Allow": allowed})


def backend_failure(exc: BackendError, where: str) -> ApiError:
    """A backend fault as the client sees it: our sentence (and when to retry); the engine's own
    words go to the log."""
    if exc.detail:
        log.warning("datalab: %s: %s", where, exc)
    retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return ApiError(exc.status, exc.code, exc.public, retry)


def redis_unavailable(exc: Exception) -> ApiError:
    """Redis's own words go to the log, not to the client."""
    log.warning("datalab: Redis: %s", exc)
    return ApiError(503, "REDIS_UNAVAILABLE", "the proxy cannot reach Redis right now; retry shortly")


UPLOADS_RETRY_AFTER = 5  # seconds: uploads in flight end within datalab_upload_timeout, most far sooner


def upload_timeout(seconds: int) -> ApiError:
    return ApiError(
        408,
        "UPLOAD_TIMEOUT",
        f"the request body did not arrive within {seconds} s of its headers; nothing was started",
    )


def header_timeout(seconds: int) -> ApiError:
    return ApiError(408, "HEADER_TIMEOUT", f"the request head did not arrive within {seconds} s")


def head_too_large(why: str) -> ApiError:
    return ApiError(431, "HEAD_TOO_LARGE", f"{why}; nothing was done")


def upstream_timeout(seconds: int) -> ApiError:
    return ApiError(504, "UPSTREAM_TIMEOUT", f"the instance did not answer within {seconds} s")


def uploads_busy(limit: int) -> ApiError:
    return ApiError(
        503,
        "CAPACITY",
        f"this proxy is already receiving as many uploads as it takes at once ({limit}); retry shortly",
        {"Retry-After": str(UPLOADS_RETRY_AFTER)},
    )
