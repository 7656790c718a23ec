"""The /datalab/* endpoints: start (upload), stop, view (cookie + redirect, or the waiting page
while the instance does not answer: waiting.py), static (fetch a path), work (the user's work:
work.py, work_files.py), the instance API for the frontend's server (instances: instance_info.py)
and health (health.py).

Refusals are decided in `requestheaders`, before an upload body is read; a body is then streamed
to the upload sink (upload.py) and never held beyond datalab_max_upload, nor waited for beyond
datalab_upload_timeout; beyond datalab_uploads_at_once bodies at once, or while health's backend check
fails, a start is refused before its signature is spent. Every error is an
ApiError, turned into JSON here; anything unexpected is a 500, never a request sent upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Mapping
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import replace as dataclasses_replace

from mitmproxy import http
from mitmproxy.connection import ConnectionState

import counters
import errors
import hosts
import inputs
import progress
import signing
import waiting
from answers import answering_errors
from answers import as_refusal
from answers import unexpected_failure
from backends import BackendError
from backends import Instance
from backends.instance_http import http_status
from errors import ApiError
from health import Health
from instance_info import InstanceInfo
from instances import DEFAULT_PROFILE
from instances import Order
from instances import OwnerLimit
from marks import CUT
from marks import HANDLED
from marks import PROGRESS
from marks import SINK
from marks import START
from marks import STATIC
from marks import STREAMED
from marks import WORK
from runtime import Runtime
from store import WorkRecord
from upload import RECEIVED
from upload import VERDICT
from upload import BodyCollector
from upload import UploadSink
from upstream import route_to_instance
from work_files import WorkFiles

log = logging.getLogger(__name__)

PREFIX = "/datalab/"
STATIC_PREFIX = PREFIX + "static/"
CLIENT_CHECK_EVERY = 0.25  # seconds between looks at whether a waiting client is still there
VIEW_PROBE = 1.0  # seconds a view waits for the instance before it answers with the waiting page
STATIC_PROBE = 5.0  # seconds a static fetch waits for the instance to answer its status
WORK_RETRY = 2  # Retry-After while a work is being saved


def is_api_path(path: str) -> bool:
    return path == PREFIX[:-1] or path.startswith(PREFIX)


# What a /datalab/static answer may do in a browser: nothing. It is the instance's content on the
# proxy's origin, so it gets an opaque origin (no allow-same-origin), and no sniffing into HTML.
PASSIVE_HEADERS = {
    "Content-Security-Policy": "sandbox",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # its links, if followed, do not carry the nonce's URL along
}


@dataclass(frozen=True)
class Signed:
    """A request whose X-SIGN checked out: its subject, and what makes the signature one-time."""

    subject: str
    signature: str


def session_cookie(name: str, value: str, samesite: str, secure: bool) -> str:
    """The Set-Cookie value: host-only (no Domain), the whole host, never readable from scripts."""
    cookie = f"{name}={value}; Path=/; HttpOnly; SameSite={samesite}"
    return cookie + "; Secure" if secure else cookie


def make_passive(response: http.Response) -> None:
    response.headers.update(PASSIVE_HEADERS)
    response.headers.pop("Set-Cookie", None)


def _passive(flow: http.HTTPFlow) -> None:
    """Whatever a /datalab/static request is answered here (a refusal too) is passive."""
    if flow.response is not None and flow.request.path.startswith(STATIC_PREFIX):
        make_passive(flow.response)


def _where(flow: http.HTTPFlow) -> str:
    """The request, as a backend fault's log line names it."""
    return f"{flow.request.method} {flow.request.path.partition('?')[0]}"


def single_param(query: http.MultiDictView, name: str) -> str:
    values = query.get_all(name)
    if len(values) != 1:
        raise errors.bad_request(f"give exactly one '{name}' query parameter")
    try:
        inputs.check_utf8(values[0])
    except ValueError as e:
        raise errors.bad_request(f"'{name}' {e}") from e
    return values[0]


async def while_client_waits[T](flow: http.HTTPFlow, work: Coroutine[None, None, T]) -> T:
    """Run `work`, cancelling it if the client hangs up first: its clean-up then leaves nothing running."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=CLIENT_CHECK_EVERY)
            if done:
                return task.result()
            if not flow.client_conn.state & ConnectionState.CAN_READ:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(499, "CLIENT_GONE", "the client closed the connection before the answer")
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


def redirect(location: str, headers: dict[str, str] | None = None) -> http.Response:
    """A view's redirect: never cached, and the next page's requests do not carry the view URL
    (with its nonce) in their Referer."""
    fixed = {"Location": location, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    return http.Response.make(302, b"", {**fixed, **(headers or {})})


class Api:
    def __init__(self, runtime: Runtime, sink: UploadSink, files: WorkFiles | None = None):
        self.runtime = runtime
        self.sink = sink
        self.files = files or WorkFiles()  # saved works are streamed from there (an addon: it must run)
        self._health: Health | None = None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not is_api_path(flow.request.path.partition("?")[0]):
            return
        flow.metadata[HANDLED] = True
        await answering_errors(flow, self._dispatch, _where, drain=self.sink, unexpected=True, finish=_passive)

    async def done(self) -> None:
        if self._health is not None:
            await self._health.close()

    async def response(self, flow: http.HTTPFlow) -> None:
        done_otherwise = flow.metadata.get(CUT) or flow.metadata.get(STREAMED)
        if START in flow.metadata and flow.metadata.get(SINK) and not done_otherwise:
            await answering_errors(flow, self._start, _where, unexpected=True)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(PROGRESS) and flow.response is not None:
            self._stream_start(flow)
        if (flow.metadata.get(STATIC) or flow.metadata.get(WORK)) and flow.response:
            flow.response.stream = True  # big files pass through without being held in memory
            make_passive(flow.response)
        if flow.metadata.get(WORK) and flow.response and flow.response.status_code == 200:
            flow.response.headers["Content-Type"] = "application/gzip"
            flow.response.headers["Content-Disposition"] = (
                f'attachment; filename="{work_filename(flow.metadata[WORK])}"'
            )
            flow.response.headers["Cache-Control"] = "no-store"

    async def _dispatch(self, flow: http.HTTPFlow) -> None:
        if not self.runtime.ready:
            raise errors.not_configured()
        path, _, query = flow.request.path.partition("?")
        _, _, rest = path.partition(PREFIX)
        endpoint, _, tail = rest.partition("/")
        if endpoint == "start" and not tail:
            self._check_method(flow, "POST")
            await self._check_start(flow)
        elif endpoint == "stop" and not tail:
            self._check_method(flow, "POST")
            await self._stop(flow)
        elif endpoint == "work" and inputs.is_token(tail):
            self._check_method(flow, "GET", "DELETE")
            await self._work(flow, tail)
        elif endpoint == "instances" and (not tail or inputs.is_token(tail)):
            self._check_method(flow, "GET")
            await self._instances(flow, tail)
        elif endpoint == "health" and not tail:
            self._check_method(flow, "GET", "HEAD")
            await self._report_health(flow)
        elif endpoint in ("view", "static") and tail:
            self._check_method(flow, "GET", "HEAD")
            nonce, _, destination = tail.partition("/")
            instance = await self.runtime.instances.by_nonce(nonce)
            if instance is None:
                raise errors.nonce_unknown()
            if endpoint == "view":
                await self._view(flow, instance, nonce, destination, query)
            else:
                await self._static(flow, instance, destination, query)
        else:
            raise errors.not_found(
                "NOT_FOUND",
                "no such endpoint; see /datalab/start, /datalab/view, /datalab/static, /datalab/work, "
                "/datalab/instances, /datalab/health",
            )

    @staticmethod
    def _check_method(flow: http.HTTPFlow, *allowed: str) -> None:
        if flow.request.method not in allowed:
            raise errors.method_not_allowed(", ".join(allowed))

    def _check_signed(
        self,
        flow: http.HTTPFlow,
        subject: str,
        check: Callable[[str], object],
        value: str | None = None,
        extras: Mapping[str, str] | None = None,
        framed: Callable[[str], str] | None = None,
    ) -> Signed:
        """The `subject` query value (or the `value` of the path that names it) of a request whose
        X-SIGN is right for it, its `ts` and, for a start, its `extras` (signing.start_subject), or
        for a read of the instance API, the subject `framed` makes of it."""
        s = self.runtime.settings
        query = flow.request.query
        ts = single_param(query, "ts")
        value = single_param(query, subject) if value is None else value
        try:
            check(value)
            ts_seconds = signing.parse_timestamp(ts)
        except ValueError as e:
            raise errors.bad_request(str(e)) from e
        message, spelled = value, subject
        if extras is not None:
            message, spelled = signing.start_subject(value, extras), signing.describe_start(extras)
        if framed is not None:
            message, spelled = framed(value), json.dumps(framed(f"<{subject}>"))
        given = flow.request.headers.get("X-SIGN", "")
        if not signing.signature_ok(s.sign_key, ts, message, given, s.sign_scheme):
            raise ApiError(403, "BAD_SIGNATURE", f"X-SIGN must be {signing.describe(s.sign_scheme, spelled)}")
        if not signing.timestamp_fresh(ts_seconds, time.time(), s.max_skew):
            raise ApiError(403, "STALE_TIMESTAMP", f"ts is more than {s.max_skew} s from the proxy's clock")
        # The canonical form is remembered, so an upper-case copy of a used signature is a replay too.
        return Signed(value, signing.signature(s.sign_key, ts, message, s.sign_scheme))

    async def _spend(self, signed: Signed) -> None:
        """A signature starts or stops once: remembered in Redis for as long as its ts is acceptable."""
        ttl = signing.replay_window(self.runtime.settings.max_skew)
        if not await self.runtime.store.spend_signature(signed.signature, ttl):
            raise ApiError(403, "REPLAYED", "this X-SIGN was used already; sign each request anew")

    async def _check_start(self, flow: http.HTTPFlow) -> None:
        """Everything about an upload that the headers tell, so a refused body is never used."""
        s = self.runtime.settings
        extras = self._start_extras(flow)
        signed = self._check_signed(flow, "filename", inputs.check_filename, extras=extras)
        order = self._order_of(signed.subject, extras)
        length = flow.request.headers.get("Content-Length")
        if length is not None and (not (length.isascii() and length.isdigit()) or int(length) > s.max_upload):
            raise self._too_large()
        if self.sink.port is None:
            raise ApiError(503, "NOT_READY", "the proxy is still starting; retry in a moment")
        if self.sink.full:  # before the signature is spent: the frontend may send this one again
            raise errors.uploads_busy(s.uploads_at_once)
        await self._check_backend()
        if order.owner and await self.runtime.instances.owner_at_cap(order.owner):
            raise OwnerLimit(s.max_instances_per_owner)  # before the signature is spent: it may come again
        await self._spend(signed)
        flow.metadata[START] = asdict(order)
        if progress.wants_progress(flow.request.headers.get("Accept", "")):
            flow.metadata[PROGRESS] = self.sink.progress.open()  # the sink's answer is its stream
        self.sink.take(flow, limit=s.max_upload, channel=flow.metadata.get(PROGRESS, ""))

    @staticmethod
    def _start_extras(flow: http.HTTPFlow) -> dict[str, str]:
        """The start's parameters besides ts and filename that change what is started (each signed),
        checked before the signature is, so a malformed one is a 400 that names it."""
        query = flow.request.query
        extras = {name: single_param(query, name) for name in signing.START_EXTRAS if name in query}
        rules: dict[str, Callable[[str], object]] = {
            "owner": inputs.check_owner,
            "profile": inputs.check_profile_name,
            "unpack": _check_unpack_flag,
        }
        for name, value in extras.items():
            try:
                rules[name](value)
            except ValueError as e:
                raise errors.bad_request(str(e)) from e
        return extras

    def _order_of(self, filename: str, extras: Mapping[str, str]) -> Order:
        """What to start: unpack=1 names the archive's kind (from the filename); a profile must be one
        the operator declared."""
        profile = extras.get("profile", DEFAULT_PROFILE)
        if profile not in self.runtime.settings.profile_table:
            raise ApiError(400, "PROFILE_UNKNOWN", f"no profile {profile!r}; the operator declares profiles")
        try:
            unpack = inputs.archive_kind(filename) if extras.get("unpack") == "1" else ""
        except ValueError as e:
            raise errors.bad_request(str(e)) from e
        return Order(filename, unpack=unpack, profile=profile, owner=extras.get("owner", ""))

    async def _check_backend(self) -> None:
        """A start the backend cannot serve (no engine, no image, no Jupyter env) is refused with what
        health says of it (its check: shared, cached), before its signature is spent or its body read:
        the frontend may send the same start again once the operator fixed it. A check that does not
        answer in time refuses nothing (the start then says what went wrong)."""
        error = await (await self._current_health()).parts["backend"].failure()
        if isinstance(error, BackendError):
            raise error

    def _too_large(self) -> ApiError:
        return ApiError(413, "UPLOAD_TOO_LARGE", f"the upload is over {self.runtime.settings.max_upload} bytes")

    async def _start(self, flow: http.HTTPFlow) -> None:
        handed = await while_client_waits(flow, self.runtime.instances.start(*self._upload_of(flow)))
        flow.response = errors.json_response(
            200, {"code": "OK", "result": {"nonce": handed.nonce, "work": handed.work}}
        )

    def _upload_of(self, flow: http.HTTPFlow) -> tuple[Order, bytearray]:
        """The start's order and its body, once the sink answered: only a body that arrived whole."""
        if not self.runtime.ready:
            raise errors.not_configured()
        collector = flow.request.stream
        if not isinstance(collector, BodyCollector):
            raise ApiError(500, "INTERNAL", "the upload body was not collected")
        if collector.too_large:
            raise self._too_large()
        if flow.response is None or flow.response.headers.get(RECEIVED) != str(collector.size):
            # The sink read another number of bytes than the client sent: never start on a cut body.
            raise errors.bad_request("the upload body did not arrive whole; send it again")
        return Order(**flow.metadata[START]), collector.body()

    def _stream_start(self, flow: http.HTTPFlow) -> None:
        """The sink answered a start's progress stream (progress.py): pass it on as it comes, and run
        the start behind it."""
        channel = self.sink.progress.get(flow.metadata[PROGRESS])
        if channel is None or flow.response.headers.get("Content-Type") != progress.EVENT_STREAM:
            return  # the sink's own answer (the body came too late): `response` gives the start's
        flow.metadata[STREAMED] = True
        flow.response.stream = True
        upload: tuple[Order, bytearray] | ApiError
        try:
            upload = self._upload_of(flow)
        except ApiError as e:
            upload = e  # told as the stream's error event
        for private in (RECEIVED, VERDICT, "Connection"):  # the sink's words to the proxy
            flow.response.headers.pop(private, None)
        channel.task = asyncio.ensure_future(self._progress_start(flow, channel, upload))

    async def _progress_start(
        self, flow: http.HTTPFlow, channel: progress.Channel, upload: tuple[Order, bytearray] | ApiError
    ) -> None:
        """The start, its phases told in the channel, then ready (nonce, work) or its error (code,
        message, status: what the JSON answer would have been); cancelled if its client goes away."""
        try:
            if isinstance(upload, ApiError):
                raise upload
            start = self.runtime.instances.start(*upload, channel.put)
            handed = await while_client_waits(flow, start)
            channel.put(progress.READY, nonce=handed.nonce, work=handed.work)
        except Exception as e:
            error = as_refusal(e, flow, _where) or unexpected_failure(flow)
            counters.refused(error.code, error.status)
            channel.put(progress.ERROR, code=error.code, message=error.message, status=error.status)
        finally:
            channel.close()

    async def _stop(self, flow: http.HTTPFlow) -> None:
        signed = self._check_signed(flow, "nonce", inputs.check_token)
        await self._spend(signed)
        nonce = signed.subject
        instance = await self.runtime.instances.by_nonce(nonce)
        if instance is None:
            raise errors.nonce_unknown()
        if not await self.runtime.instances.end(instance, "stopped by the frontend", "stopped"):
            await self.runtime.instances.wait_stopped(instance)  # another stop or a cull is ending it
        flow.response = errors.json_response(200, {"code": "OK", "result": {}})

    async def _view(self, flow: http.HTTPFlow, instance: Instance, nonce: str, destination: str, query: str) -> None:
        s = self.runtime.settings
        location = inputs.safe_destination(destination, query)
        if s.routing == "subdomain":
            if not self._on_own_host(flow, instance):
                # The cookie must be set by the instance's own host: send the browser there first
                # (scheme-relative, so it keeps whatever scheme it came with).
                here = hosts.instance_host(instance.id, s.public_host)
                flow.response = redirect(f"//{here}{PREFIX}view/{nonce}{location}")
                return
        elif not self._may_navigate_here(flow):
            raise ApiError(
                403,
                "BAD_ORIGIN",
                "a page of another site may open views only if its origin is in datalab_allowed_origins",
            )
        answers = await self._answers(instance, VIEW_PROBE)
        self.runtime.activity.touch(instance.id)
        session_id = await self.runtime.instances.open_session(instance)
        if session_id is None:
            raise errors.nonce_unknown()  # it ended a moment ago
        cookie = {"Set-Cookie": session_cookie(s.session_cookie, session_id, s.cookie_samesite, s.cookie_secure)}
        if answers:
            flow.response = redirect(location, cookie)
        else:  # not mitmproxy's 502 page: a page that waits for the instance, then goes on
            flow.response = http.Response.make(200, waiting.page(location), {**waiting.headers(s.origins), **cookie})

    async def _answers(self, instance: Instance, timeout: float, ending_is_gone: bool = True) -> bool:
        """Whether the instance answers its status now. One that does not may be starting or busy;
        if its backend says it is gone, it ends here for everyone, and this request gets 410 (or,
        without `ending_is_gone`, False)."""
        if await http_status(instance.host, instance.port, "/api/status", timeout, token=instance.token) is not None:
            return True
        if await self.runtime.instances.end_if_gone(instance.id) and ending_is_gone:
            raise errors.instance_gone()
        return False

    def _on_own_host(self, flow: http.HTTPFlow, instance: Instance) -> bool:
        """The host rule of a nonce's endpoints, view and static alike, in subdomain routing: on
        another instance's host the nonce is not known (that host is another origin, whose pages
        must not get this instance's content); True on the instance's own host, False elsewhere."""
        where = hosts.place(flow.request.host_header or "", self.runtime.settings.public_host, instance.id)
        if where == hosts.OTHER:
            raise errors.nonce_unknown()
        return where == hosts.OWN

    def _may_navigate_here(self, flow: http.HTTPFlow) -> bool:
        """In cookie routing a view re-points the browser's one session: a page of another site
        must not do that behind the user's back (the user's open tabs would then save into the
        other site's instance). Browsers say where a navigation started (Sec-Fetch-Site, Referer);
        the frontend's own origin is allowed when listed in datalab_allowed_origins."""
        if flow.request.headers.get("Sec-Fetch-Site", "").lower() != "cross-site":
            return True
        referer = hosts.origin_of(flow.request.headers.get("Referer", ""))
        return bool(referer) and referer in self.runtime.settings.origins

    async def _static(self, flow: http.HTTPFlow, instance: Instance, destination: str, query: str) -> None:
        if self.runtime.settings.routing == "subdomain":
            self._on_own_host(flow, instance)  # served on its own host or the main one, as view
        if "Upgrade" in flow.request.headers:
            raise errors.bad_request("static fetches plain paths; it opens no WebSocket")
        # mitmproxy answers an unreachable upstream with its own HTML page: check first, answer in JSON.
        if not await self._answers(instance, STATIC_PROBE):
            raise ApiError(502, "INSTANCE_UNREACHABLE", "the instance for this nonce does not answer")
        flow.request.headers.pop("Cookie", None)  # the frontend's cookies are not the instance's business
        # Jupyter serves /files/ only to same-site requests (XSRF token or Referer): a static fetch is
        # the proxy's own, made for the nonce's holder, and its answer is sandboxed (make_passive).
        flow.request.headers["Referer"] = f"http://{flow.request.host_header}/"
        route_to_instance(flow, instance)
        self.runtime.activity.touch(instance.id)
        flow.request.path = inputs.safe_destination(destination, query)
        flow.metadata[STATIC] = True

    async def _work(self, flow: http.HTTPFlow, work_id: str) -> None:
        """GET: the working directory as a tar.gz (a live snapshot, or the saved archive); DELETE: forget it."""
        signed = self._check_signed(flow, "id", inputs.check_token, value=work_id)
        await self._spend(signed)
        record = await self.runtime.store.work(work_id)
        if record is None:
            raise errors.not_found("WORK_UNKNOWN", "no work has this id (or it expired); see datalab_work_ttl")
        if record.state == "saving" and self._save_abandoned(record):
            if flow.request.method == "DELETE" and await self.runtime.instances.work.delete(record):
                flow.response = errors.json_response(200, {"code": "OK", "result": {}})
                return
            raise ApiError(410, "WORK_UNSAVED", "this work's save was interrupted; it could not be saved")
        if flow.request.method == "DELETE":
            await self._delete_work(flow, record)
        elif record.state == "live":
            await self._live_work(flow, record)
        elif record.state == "saved":
            path = self.runtime.instances.work.path(record.id)
            if not await asyncio.to_thread(path.is_file):
                raise ApiError(503, "WORK_UNAVAILABLE", "the saved work is not in this proxy's work store")
            self.files.send_saved(flow, path)
            flow.metadata[WORK] = record.id
        else:
            raise _work_refusal(record)

    def _save_abandoned(self, record: WorkRecord) -> bool:
        """A save no proxy is doing any more, nor the culler's sweep can find whole (work.py)."""
        settled = self.runtime.instances.work.settled_after + 3 * self.runtime.settings.cull_interval
        return time.time() > record.ended_at + settled

    async def _live_work(self, flow: http.HTTPFlow, record: WorkRecord) -> None:
        """A snapshot made by the running instance, relayed by work_files.py under the save's rules."""
        instance = await self.runtime.instances.record(record.instance)
        if instance is None:  # ending this moment: its record says saving in a moment
            raise _work_refusal(dataclasses_replace(record, state="saving"))
        if not await self._answers(instance, STATIC_PROBE, ending_is_gone=False):
            raise ApiError(502, "INSTANCE_UNREACHABLE", "the instance does not answer; retry shortly")
        self.files.send_live(flow, instance, self.runtime.instances.work.max_bytes)
        flow.metadata[WORK] = record.id

    async def _delete_work(self, flow: http.HTTPFlow, record: WorkRecord) -> None:
        if record.state in ("live", "saving"):
            raise _work_refusal(record)
        if record.state == "deleted" or not await self.runtime.instances.work.delete(record):
            raise ApiError(410, "WORK_DELETED", "this work was deleted")
        flow.response = errors.json_response(200, {"code": "OK", "result": {}})

    async def _instances(self, flow: http.HTTPFlow, work_id: str) -> None:
        """The instance API, for the frontend's server: an owner's instances, or one by its work id.
        Signed, but the signature is not spent: a read changes nothing, a frontend may retry it, and
        its ts bounds how long a captured one can be read again. What a browser sends is refused."""
        _refuse_browsers(flow)
        info = InstanceInfo(self.runtime.store, self.runtime.instances.owners, self.runtime.settings)
        if work_id:
            self._check_signed(flow, "work", inputs.check_token, value=work_id, framed=signing.instance_subject)
            entry = await info.of_work(work_id)
            if entry is None:
                raise errors.not_found("WORK_UNKNOWN", "no instance's work has this id (or it expired)")
            result = entry.to_json()
        else:
            signed = self._check_signed(flow, "owner", inputs.check_owner, framed=signing.owner_listing_subject)
            listed, omitted = await info.listing(signed.subject)
            result = {"instances": [e.to_json() for e in listed], "omitted": omitted}
        flow.response = errors.json_response(200, {"code": "OK", "result": result})

    async def _current_health(self) -> Health:
        """Built once per set of parts: its shared, cached checks are what keep it cheap."""
        if self._health is None or self._health.instances is not self.runtime.instances:
            if self._health is not None:
                await self._health.close()
            self._health = Health(self.runtime.instances)
        return self._health

    async def _report_health(self, flow: http.HTTPFlow) -> None:
        status, body = await (await self._current_health()).report()
        flow.response = errors.json_response(status, body)


def _refuse_browsers(flow: http.HTTPFlow) -> None:
    """The instance API answers servers only: a request that says it comes from a browser's page
    (Origin, Sec-Fetch-Site) is refused, whatever it carries; no cookie is ever read there."""
    if "Origin" in flow.request.headers or "Sec-Fetch-Site" in flow.request.headers:
        raise ApiError(403, "BAD_ORIGIN", "the instance API is for the frontend's server, not for browsers")


def _check_unpack_flag(flag: str) -> None:
    if flag not in ("0", "1"):
        raise ValueError("unpack is 1 (unpack the archive) or 0")


def work_filename(work_id: str) -> str:
    return f"datalab-work-{work_id[:8]}.tar.gz"


def _work_refusal(record: WorkRecord) -> ApiError:
    """What a work that cannot be sent (or deleted) now says, by its state."""
    if record.state == "live":
        return ApiError(409, "WORK_LIVE", "the instance still runs: stop it before deleting its work")
    if record.state == "saving":
        retry = {"Retry-After": str(WORK_RETRY)}
        return ApiError(503, "WORK_SAVING", "the instance ended and its work is being saved; retry shortly", retry)
    if record.state == "unsaved":
        return ApiError(410, "WORK_UNSAVED", f"this work could not be saved: {record.why or 'no reason recorded'}")
    return ApiError(410, "WORK_DELETED", "this work was deleted")
